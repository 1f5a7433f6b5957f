#!/usr/bin/env bash
# usage: run.sh TREE OUTDIR: the presets whose numbers must not change, both frameworks
set -u
TREE=$1; OUT=$2; mkdir -p $OUT; cd $TREE
export JAXBENCH_DATA_DIR=/tmp/data
for fw in jaxbench torch_ref; do
  python -m $fw.train --config tiny --out $OUT/tiny-$fw --no-progress > $OUT/tiny-$fw.log 2>&1; echo "tiny $fw rc=$?"
  python -m $fw.train --config speedrun --subset 2000 --test-subset 1000 --epochs 2 --lr-peak-epoch 0.5 --out $OUT/speedrun-$fw --no-progress > $OUT/speedrun-$fw.log 2>&1; echo "speedrun $fw rc=$?"
  python -m $fw.train --config speedrun_muon --subset 2000 --test-subset 1000 --epochs 2 --out $OUT/speedrun_muon-$fw --no-progress > $OUT/speedrun_muon-$fw.log 2>&1; echo "speedrun_muon $fw rc=$?"
done
