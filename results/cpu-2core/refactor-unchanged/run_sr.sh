#!/usr/bin/env bash
set -u
TREE=$1; OUT=$2; mkdir -p $OUT; cd $TREE
export JAXBENCH_DATA_DIR=/tmp/data
for fw in jaxbench torch_ref; do
  python -m $fw.train --config speedrun --subset 2000 --test-subset 1000 --epochs 2 --lr-peak-epoch 0.5 --out $OUT/speedrun-$fw --no-progress > $OUT/speedrun-$fw.log 2>&1; echo "speedrun $fw rc=$?"
done
