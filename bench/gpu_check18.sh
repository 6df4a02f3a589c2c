#!/usr/bin/env bash
# Prepared 2026-12-04 (twenty-sixth and twenty-seventh sessions, neither with GPU time left) for the next session
# with a GPU; at most about 9.8 minutes:
#   run(command="OUT=$OUT bash bench/gpu_check18.sh", carry=[".whl"], timeout_s=595)
# The library as it is after runs 12 and 13: k-means' features from clustermask/features_kernel.py (on by
# default), its padding rows no longer zeroed (run 13 measured the kernel with the fill, 0.061 + 0.024 ms); two
# candidates, off by default, none measured yet:
#   `tfused` (tfused1, tfused4): the channels' statistics in the features' kernel
#     (features_kernel.standardised_features; FUSED_STATISTICS, with 2, 1 or 4 programs per SM);
#   `tassign`: k-means' steps between its GEMMs in clustermask/assignment_kernel.py, a program per image, one launch
#     per iteration in place of inductor's four small kernels and their autotuning (assignment_kernel.USE_ON_GPU).
# 1. The kernels' CUDA tests (features, assignment, Gram; ViT-Tiny's tower compiled with kmeans, each kernel in its
#    training graph, never run on a GPU yet): a candidate is measured only if its tests pass.
# 2. The op alone, compiled, at 0.5, every strategy; kmeans also as each candidate and their union, `inductorfeat`
#    (inductor's features, as until run 13) and `tf32iter` (not adoptable: a change of precision); 12 kernels each,
#    with inductor's generated code and its autotuning (TORCH_LOGS output_code and
#    +torch._inductor.runtime.triton_heuristics: each config's time).
# 3. The compiled steps at 0.5 of random and kmeans in turn (3 rounds), kmeans as whichever adoptable variant had
#    the fewest op kernel ms in 2: the op's share of the same run's step. If that variant is not `current`, set its
#    switches in the library (it is the library with them set).
# 4. kmeans' op alone twice more (the library as it is), each in a fresh process with inductor's caches off, the
#    second without autotuning the reductions (TORCHINDUCTOR_FORCE_FILTER_REDUCTION_CONFIGS=1): whether the small
#    k-means kernel of 0.008 ms in run 12 and 0.042 ms in run 13 (same code) is a pick by chance. The suspicion: a
#    kernel of 8 us is timed launch-bound when autotuned (its mutated buffer cloned inside the timed call), so its
#    configs measure alike; XBLOCK=1 (50176 programs of 8 values) would explain 0.042 ms.
# 5. In the time left, every other CUDA test.
set -u
source bench/gpu_setup.sh  # sets OUT to a work folder, packed into $OUT/<script>.tgz: pack, quiet LOG
AUTOTUNE_LOG=+torch._inductor.runtime.triton_heuristics
TOWER=tests/test_masking.py::test_compiled_tower_trains_kmeans_on_a_gpu_with_its_kernels_in_the_graph
KERNEL_TESTS="tests/test_features_kernel.py tests/test_assignment_kernel.py tests/test_gram_kernel.py $TOWER"
timeout 170 python3 -m pytest -q -rA -p no:cacheprovider $KERNEL_TESTS -m gpu 2>&1 \
  | tee "$OUT/gpu_tests_kernels.txt" | tail -3
passed() {  # the tests of $1 (a file) matching $2 all passed, and at least one ran
  local log="$OUT/gpu_tests_kernels.txt"
  grep -q -E "^PASSED $1::[^ ]*$2" "$log" && ! grep -q -E "^(FAILED|ERROR) $1::[^ ]*$2" "$log"
}
VARIANTS=current
FUSED=0; passed tests/test_features_kernel.py "" && passed tests/test_masking.py "\[fused\]" && FUSED=1
ASSIGN=0; passed tests/test_assignment_kernel.py "" && passed tests/test_masking.py "\[assign\]" && ASSIGN=1
[ $FUSED = 1 ] && [ $ASSIGN = 1 ] && VARIANTS+=,tfused+tassign
[ $FUSED = 1 ] && VARIANTS+=,tfused
[ $ASSIGN = 1 ] && VARIANTS+=,tassign
[ $FUSED = 1 ] && VARIANTS+=,tfused1,tfused4
VARIANTS+=,inductorfeat,tf32iter
echo "kmeans variants: $VARIANTS" | tee "$OUT/kmeans_variants.txt"
pack
TORCH_LOGS="output_code,$AUTOTUNE_LOG" timeout 210 python3 bench/masking.py --out "$OUT/masking_op" --op-only \
  --modes compiled --compile-ratios 0.5 --strategies random,cluster-rgb,cluster-embedding,cluster-mixed,kmeans \
  --variants "$VARIANTS" --kernels 12 --budget-s 190 2> "$OUT/output_code.log" | quiet "$OUT/masking_op.log"
BEST=$(python3 - "$OUT/masking_op.json" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except (OSError, ValueError):
    rows = []
kmeans = {r["variant"]: r["op_kernel_ms"] for r in rows
          if r["strategy"] == "kmeans" and r.get("op_kernel_ms") and r["variant"] != "tf32iter"}
print(min((ms, name) for name, ms in kmeans.items())[1] if kmeans else "current")
PY
)
echo "kmeans' step as: $BEST" | tee "$OUT/best_variant.txt"
timeout 190 python3 bench/masking.py --out "$OUT/masking_compiled_steps" --modes compiled --compile-ratios 0.5 \
  --strategies random,kmeans --interleave 3 --variants "$BEST" 2>&1 | quiet "$OUT/masking_compiled_steps.log"
for round in 1 2; do  # kmeans' op again, each time compiled afresh (no inductor cache): does it vary?
  [ "$SECONDS" -lt 470 ] || break
  TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 TORCHINDUCTOR_FORCE_FILTER_REDUCTION_CONFIGS=$((round - 1)) \
    TORCH_LOGS="$AUTOTUNE_LOG" timeout 40 python3 bench/masking.py --out "$OUT/masking_op_kmeans_$round" \
    --op-only --modes compiled --compile-ratios 0.5 --strategies kmeans --kernels 12 \
    2> "$OUT/autotune_kmeans_$round.log" | quiet "$OUT/masking_op_kmeans_$round.log"
done
[ "$SECONDS" -lt 540 ] && timeout $((585 - SECONDS)) python3 -m pytest -q -p no:cacheprovider \
  tests/test_masking.py tests/test_train.py tests/test_evaluate.py -m gpu 2>&1 \
  | tee "$OUT/gpu_tests_other_full.txt" | tail -4 | tee "$OUT/gpu_tests_other.txt"
pack
