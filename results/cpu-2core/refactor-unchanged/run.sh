#!/usr/bin/env bash
# usage: run.sh TREE OUTDIR
set -u
TREE=$1; OUT=$2; mkdir -p $OUT; cd $TREE
export JAXBENCH_DATA_DIR=/tmp/data
for t in 1 2; do
  for fw in jaxbench torch_ref; do
    PJRT_NPROC=$t NPROC=$t OMP_NUM_THREADS=$t MKL_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t \
      python -m $fw.train --config tiny --out $OUT/tiny-$fw-t$t --no-progress > $OUT/tiny-$fw-t$t.log 2>&1; echo "tiny $fw t$t rc=$?"
  done
done
for c in resnet9; do
  for fw in jaxbench torch_ref; do
    python -m $fw.train --config $c --subset 2000 --test-subset 1000 --epochs 2 --out $OUT/$c-$fw --no-progress > $OUT/$c-$fw.log 2>&1; echo "$c $fw rc=$?"
  done
done
/tmp/cmp/run_sr.sh $TREE $OUT
