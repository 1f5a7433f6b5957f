#!/usr/bin/env bash
# usage: run-2026-12-07.sh TREE OUTDIR   (JAXBENCH_DATA_DIR: the unpacked CIFAR-10)
set -u
TREE=$1; OUT=$2; mkdir -p $OUT; cd $TREE
export JAXBENCH_DATA_DIR=${JAXBENCH_DATA_DIR:?set it to the unpacked CIFAR-10} PYTHONPATH=$TREE
unset JAX_COMPILATION_CACHE_DIR
for t in 1 2; do
  for fw in jaxbench torch_ref; do
    PJRT_NPROC=$t NPROC=$t OMP_NUM_THREADS=$t MKL_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t \
      python -m $fw.train --config tiny --out $OUT/tiny-$fw-t$t --no-progress > $OUT/tiny-$fw-t$t.log 2>&1; echo "tiny $fw t$t rc=$?"
  done
done
for fw in jaxbench torch_ref; do
  python -m $fw.train --config resnet9 --subset 2000 --test-subset 1000 --epochs 2 --out $OUT/resnet9-$fw --no-progress > $OUT/resnet9-$fw.log 2>&1; echo "resnet9 $fw rc=$?"
  python -m $fw.train --config speedrun --subset 2000 --test-subset 1000 --epochs 2 --lr-peak-epoch 0.5 --out $OUT/speedrun-$fw --no-progress > $OUT/speedrun-$fw.log 2>&1; echo "speedrun $fw rc=$?"
  for c in speedrun_muon speedrun_record; do
    python -m $fw.train --config $c --subset 2000 --test-subset 1000 --epochs 2 --out $OUT/$c-$fw --no-progress > $OUT/$c-$fw.log 2>&1; echo "$c $fw rc=$?"
  done
done
