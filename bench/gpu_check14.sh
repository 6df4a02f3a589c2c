#!/usr/bin/env bash
# Run on 2026-12-04 (twenty-fifth session) right after gpu_check13.sh (run 9), in the 340 s of device time left:
#   run(command="OUT=$OUT bash bench/gpu_check14.sh", carry=[".whl"], timeout_s=250)
# with clustermask/gram_kernel.py on by default on a GPU (sm80 or later) since run 9:
# 1. Every CUDA test (`-m gpu`), the library's kmeans now taking the kernel's Gram.
# 2. In the time left: the op alone, compiled, for kmeans as the library has it and as `features` (the Gram from
#    the features' kernel and cuBLAS, the library's path until run 9).
set -u
source bench/gpu_setup.sh  # sets OUT to a work folder, packed into $OUT/<script>.tgz: pack, quiet LOG
timeout 150 python3 -m pytest -q -p no:cacheprovider tests -m gpu 2>&1 | tee "$OUT/gpu_tests_full.txt" | tail -4 \
  | tee "$OUT/gpu_tests.txt"
pack
timeout $((225 - SECONDS)) python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled \
  --compile-ratios 0.5 --strategies kmeans --variants current,features --kernels 8 2>&1 | quiet "$OUT/masking_op.log"
