#!/usr/bin/env bash
# Prepared 2026-12-04 (twenty-sixth session) for the next session with a GPU; at most about 9.5 minutes:
#   run(command="OUT=$OUT bash bench/gpu_check18.sh", carry=[".whl"], timeout_s=590)
# The library as it is after runs 12 and 13: k-means' features from clustermask/features_kernel.py (on by
# default), its padding rows no longer zeroed (run 13 measured the kernel with the fill, 0.061 + 0.024 ms).
# 1. The op alone, compiled, at 0.5, every strategy; kmeans also as `inductorfeat` (inductor's features, as until
#    run 13), `tf32iter` and `tfused`, `tfused1`, `tfused4` (the statistics in the features' kernel:
#    features_kernel.standardised_features, off by default, 2, 1 or 4 programs per SM); 12 kernels each, with
#    inductor's generated code (TORCH_LOGS=output_code): whether the small k-means kernel of 0.008 ms in run 12
#    and 0.042 ms in run 13 (same code) varies again; then kmeans' op alone three more times, each in a process
#    of its own with inductor's caches off (its choices made afresh), the third without autotuning the reductions
#    (TORCHINDUCTOR_FORCE_FILTER_REDUCTION_CONFIGS=1: one config each, by inductor's heuristic). Every stage
#    logs inductor's autotuning (+torch._inductor.runtime.triton_heuristics, DEBUG: each config's time). The
#    suspicion to check: a kernel of 8 us is timed launch-bound when autotuned (its mutated buffer is cloned
#    inside the timed call), so its configs measure alike and the pick is by chance, then cached for the process
#    (run 13's every kmeans variant had the slow one); XBLOCK=1 (50176 programs) would explain 0.042 ms.
#    If `tfused` (or tfused1/4) beats `current`, set features_kernel.FUSED_STATISTICS (and PROGRAMS_PER_SM).
# 2. The compiled steps at 0.5 of random and kmeans in turn (3 rounds): the op's share of the same run's step.
# 3. In the time left, every CUDA test, those of the kernels and of k-means first.
set -u
source bench/gpu_setup.sh  # sets OUT to a work folder, packed into $OUT/<script>.tgz: pack, quiet LOG
AUTOTUNE_LOG=+torch._inductor.runtime.triton_heuristics
TORCH_LOGS="output_code,$AUTOTUNE_LOG" timeout 210 python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled \
  --compile-ratios 0.5 --strategies random,cluster-rgb,cluster-embedding,cluster-mixed,kmeans \
  --variants current,inductorfeat,tf32iter,tfused,tfused1,tfused4 --kernels 12 --budget-s 190 \
  2> "$OUT/output_code.log" | quiet "$OUT/masking_op.log"
for round in 1 2 3; do  # kmeans' op again, each time compiled afresh (no inductor cache): does it vary?
  [ "$SECONDS" -lt 285 ] || break
  filter=0; [ "$round" -lt 3 ] || filter=1  # the third: no autotuning of reductions
  TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 TORCHINDUCTOR_FORCE_FILTER_REDUCTION_CONFIGS=$filter TORCH_LOGS="$AUTOTUNE_LOG" \
    timeout 40 python3 bench/masking.py --out "$OUT/masking_op_kmeans_$round" --op-only --modes compiled \
    --compile-ratios 0.5 --strategies kmeans --kernels 12 2> "$OUT/autotune_kmeans_$round.log" \
    | quiet "$OUT/masking_op_kmeans_$round.log"
done
left=$((440 - SECONDS)); [ "$left" -lt 200 ] || left=200
timeout "$left" python3 bench/masking.py --out "$OUT/masking_compiled_steps" --modes compiled \
  --compile-ratios 0.5 --strategies random,kmeans --interleave 3 2>&1 | quiet "$OUT/masking_compiled_steps.log"
FIRST="kmeans or gram or standardis or config4 or features"
timeout $((520 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/test_features_kernel.py \
  tests/test_gram_kernel.py tests/test_masking.py -m gpu -k "$FIRST" 2>&1 | tee "$OUT/gpu_tests_first_full.txt" \
  | tail -4 | tee "$OUT/gpu_tests_first.txt"
pack
timeout $((580 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_train.py \
  tests/test_evaluate.py -m gpu -k "not ($FIRST)" 2>&1 | tee "$OUT/gpu_tests_other_full.txt" | tail -4 \
  | tee "$OUT/gpu_tests_other.txt"
