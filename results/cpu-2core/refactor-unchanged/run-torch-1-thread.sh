#!/usr/bin/env bash
# usage: run-torch-1-thread.sh TREE OUT: torch_ref tiny on one core (taskset) and on two, the tree on PYTHONPATH
set -u
TREE=$1; OUT=$2; mkdir -p $OUT; cd $TREE
export JAXBENCH_DATA_DIR=${JAXBENCH_DATA_DIR:?set it to the unpacked CIFAR-10} PYTHONPATH=$TREE
unset JAX_COMPILATION_CACHE_DIR
PJRT_NPROC=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 taskset -c 0 \
  python -m torch_ref.train --config tiny --out $OUT/tiny-torch_ref-t1 --no-progress > $OUT/tiny-torch_ref-t1.log 2>&1; echo "t1 rc=$?"
PJRT_NPROC=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 \
  python -m torch_ref.train --config tiny --out $OUT/tiny-torch_ref-t2 --no-progress > $OUT/tiny-torch_ref-t2.log 2>&1; echo "t2 rc=$?"
