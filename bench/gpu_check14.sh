#!/usr/bin/env bash
# Run on 2026-12-04 (twenty-fifth session) as run 10, right after gpu_check13.sh (run 9), with
# clustermask/gram_kernel.py then on by default on a GPU (sm80 or later); at most about 4 minutes:
#   run(command="OUT=$OUT bash bench/gpu_check14.sh", carry=[".whl"], timeout_s=250)
# Run 10 collected `tests -m gpu`, which failed on the modules that import hydra or mlflow (not on the lent machine):
# it now names the CUDA test files, as the scripts before it did.
# 1. Every CUDA test (`-m gpu`), the library's kmeans then taking the kernel's Gram.
# 2. In the time left: the op alone, compiled, for kmeans as the library has it and as `features` (the Gram from
#    the features' kernel and cuBLAS, the library's path).
set -u
source bench/gpu_setup.sh  # sets OUT to a work folder, packed into $OUT/<script>.tgz: pack, quiet LOG
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_train.py tests/test_evaluate.py \
  tests/test_gram_kernel.py -m gpu 2>&1 | tee "$OUT/gpu_tests_full.txt" | tail -4 | tee "$OUT/gpu_tests.txt"
pack
timeout $((225 - SECONDS)) python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled \
  --compile-ratios 0.5 --strategies kmeans --variants current,features --kernels 8 2>&1 | quiet "$OUT/masking_op.log"
