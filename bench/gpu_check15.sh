#!/usr/bin/env bash
# Prepared 2026-12-04 (twenty-fifth session) for the next session with a GPU; at most about 8 minutes:
#   run(command="OUT=$OUT bash bench/gpu_check15.sh", carry=[".whl"], timeout_s=520)
# Why kmeans' op with clustermask/gram_kernel.py's Gram came to 0.344 ms in run 9 and 0.370 in runs 10 and 11, where
# inductor fused k-means' last iteration with the scores into a 0.033 ms kernel (bench/README.md, runs 9-11):
# 1. Every CUDA test (`-m gpu`), the Gram kernel off (the library's default) and, in its own tests, on.
# 2. The op alone, compiled, for kmeans as `features` (the library's path) and `tgram128` (the kernel's Gram), each
#    in its own process, three times in turn, with inductor's generated code (TORCH_LOGS=output_code) kept for each,
#    so that the kernels around the Gram can be compared where the fusion differs.
# 3. In the time left: the compiled steps at 0.5 of random and kmeans as `tgram128`, in turn.
set -u
source bench/gpu_setup.sh  # sets OUT to a work folder, packed into $OUT/<script>.tgz: pack, quiet LOG
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_train.py tests/test_evaluate.py \
  tests/test_gram_kernel.py -m gpu 2>&1 | tee "$OUT/gpu_tests_full.txt" | tail -4 | tee "$OUT/gpu_tests.txt"
pack
for round in 1 2 3; do
  for name in features tgram128; do
    [ "$SECONDS" -lt 330 ] || break 2
    TORCH_LOGS=output_code timeout 60 python3 bench/masking.py --out "$OUT/masking_op_${name}_$round" --op-only \
      --modes compiled --compile-ratios 0.5 --strategies kmeans --variants "$name" --kernels 12 \
      2> "$OUT/output_code_${name}_$round.log" | quiet "$OUT/masking_op_${name}_$round.log"
  done
done
if [ "$SECONDS" -lt 360 ]; then
  timeout $((500 - SECONDS)) python3 bench/masking.py --out "$OUT/masking_compiled_steps" --modes compiled \
    --compile-ratios 0.5 --strategies random,kmeans --interleave 3 --variants tgram128 2>&1 \
    | quiet "$OUT/masking_compiled_steps.log"
fi
