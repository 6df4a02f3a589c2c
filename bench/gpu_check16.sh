#!/usr/bin/env bash
# Prepared 2026-12-04 (twenty-sixth session); at most about 9 minutes:
#   run(command="OUT=$OUT bash bench/gpu_check16.sh", carry=[".whl"], timeout_s=570)
# k-means' features kernel with each channel's 1 / (std + eps) read from a buffer of its own (masking.materialised)
# rather than a square root and a division inlined into every pixel it writes (0.121 ms in run 9, 2.5x its bytes):
# 1. the CUDA tests of the path that changed: the Gram kernel's, k-means', the standardisation's, kmeans' no-sync;
# 2. the op alone, compiled, at 0.5, every strategy; kmeans also as `divided` (the standardisation as it was),
#    `sumstats` (the statistics from shifted sums), `tgram128`, `sumstats+tgram128` and `tf32iter` (the
#    iterations' bmm in TF32, what they would gain); 12 kernels each, with
#    inductor's generated code (TORCH_LOGS=output_code);
# 3. the compiled steps at 0.5 of random and kmeans in turn (3 rounds): the op's share of the same run's step;
# 4. in the time left: the other CUDA tests.
set -u
source bench/gpu_setup.sh  # sets OUT to a work folder, packed into $OUT/<script>.tgz: pack, quiet LOG
CHANGED="kmeans or gram or standardis or config4"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_gram_kernel.py -m gpu \
  -k "$CHANGED" 2>&1 | tee "$OUT/gpu_tests_changed_full.txt" | tail -4 | tee "$OUT/gpu_tests_changed.txt"
pack
TORCH_LOGS=output_code timeout 170 python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled \
  --compile-ratios 0.5 --strategies random,cluster-rgb,cluster-embedding,cluster-mixed,kmeans \
  --variants current,divided,sumstats,tgram128,sumstats+tgram128,tf32iter --kernels 12 --budget-s 150 \
  2> "$OUT/output_code.log" | quiet "$OUT/masking_op.log"
if [ "$SECONDS" -lt 330 ]; then
  left=$((520 - SECONDS)); [ "$left" -lt 200 ] || left=200
  timeout "$left" python3 bench/masking.py --out "$OUT/masking_compiled_steps" --modes compiled \
    --compile-ratios 0.5 --strategies random,kmeans --interleave 3 2>&1 | quiet "$OUT/masking_compiled_steps.log"
fi
if [ "$SECONDS" -lt 470 ]; then
  timeout $((545 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_train.py \
    tests/test_evaluate.py -m gpu -k "not ($CHANGED)" 2>&1 | tee "$OUT/gpu_tests_other_full.txt" | tail -4 \
    | tee "$OUT/gpu_tests_other.txt"
fi
