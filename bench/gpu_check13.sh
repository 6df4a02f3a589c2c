#!/usr/bin/env bash
# Run on 2026-12-04 as run 9 (521 s; bench/README.md). clustermask/kmeans_kernel.py, its tests and its `titer`
# variants were removed after it (commit 294e73f has them), so it no longer runs as it is: a record.
# Prepared earlier that day (twenty-fifth session, then without a GPU); at most about 9.5 minutes:
#   run(command="OUT=$OUT bash bench/gpu_check13.sh", carry=[".whl"], timeout_s=590)
# .whl also holds numpy 2.3.5 for Python 3.12 (pyproject.toml's numpy<2.4; the machine's 2.5 breaks clip_benchmark).
# Replaces gpu_check12.sh (never run), adding clustermask/kmeans_kernel.py (k-means' iterations in one Triton program
# per image) to clustermask/gram_kernel.py (k-means' Gram from the pixels): neither compiled for a GPU yet beyond
# bench/kernels_ptx.py, both checked on the CPU under Triton's interpreter only. Most needed first; each stage packs
# its results into $OUT/gpu_check13.tgz:
# 1. The kernels' own CUDA tests (each against the library's path, eager and compiled in k-means, no host sync).
# 2. The op alone at 0.5, compiled: every strategy as the library has it, and kmeans as `tgram128`, `tgram` (the
#    Gram kernel, tiles of 128 or 64), `titer`, `titerieee`, `titertf32` (the iterations kernel, its products as
#    TF32 x 3, fp32 or TF32), `tgram128+titer` and `tgram128+titertf32`, each only where its kernels' tests passed
#    in stage 1 (for the iterations, that precision's agreement with fp32 on the CPU too).
# 3. The compiled steps at 0.5 of random, cluster-mixed and kmeans, in turn, kmeans as whichever kmeans variant had
#    the fewest op kernel ms in stage 2.
# 4. The other CUDA tests (`-m gpu`: test_masking, test_train, test_evaluate).
# 5. In the time left: the steps at 0.5 of the eager model with the op compiled alone, in turn.
set -u
source bench/gpu_setup.sh  # sets OUT to a work folder, packed into $OUT/<script>.tgz: pack, quiet LOG
timeout 200 python3 -m pytest -q -rA -p no:cacheprovider tests/test_gram_kernel.py tests/test_kmeans_kernel.py \
  -m gpu 2>&1 | tee "$OUT/gpu_tests_kernels.txt" | tail -3
LOG1="$OUT/gpu_tests_kernels.txt"
gram_kernel_ok() {
  local tests=tests/test_gram_kernel.py
  grep -q "^PASSED $tests" "$LOG1" && ! grep -q -E "^(FAILED|ERROR) $tests" "$LOG1"
}
# the k-means kernel's tests but for each precision's agreement with fp32, which decides that precision's variant
kmeans_kernel_ok() {
  grep -q "^PASSED tests/test_kmeans_kernel.py" "$LOG1" \
    && ! grep -E "^(FAILED|ERROR) tests/test_kmeans_kernel.py" "$LOG1" | grep -q -v "precision_agrees"
}
precision_ok() {
  grep -q "^PASSED tests/test_kmeans_kernel.py::test_each_precision_agrees_with_fp32_on_a_gpu\[$1\]" "$LOG1"
}
GRAM=0; gram_kernel_ok && GRAM=1
declare -A ITER=([titer]=0 [titerieee]=0 [titertf32]=0)
kmeans_kernel_ok && precision_ok tf32x3 && ITER[titer]=1
kmeans_kernel_ok && precision_ok ieee && ITER[titerieee]=1
kmeans_kernel_ok && precision_ok tf32 && ITER[titertf32]=1
# the likeliest fastest first, in case the op stage's budget runs out
KMEANS_VARIANTS=current
[ $GRAM = 1 ] && [ ${ITER[titer]} = 1 ] && KMEANS_VARIANTS+=,tgram128+titer
[ $GRAM = 1 ] && [ ${ITER[titertf32]} = 1 ] && KMEANS_VARIANTS+=,tgram128+titertf32
[ ${ITER[titer]} = 1 ] && KMEANS_VARIANTS+=,titer
[ $GRAM = 1 ] && KMEANS_VARIANTS+=,tgram128
[ ${ITER[titertf32]} = 1 ] && KMEANS_VARIANTS+=,titertf32
[ ${ITER[titerieee]} = 1 ] && KMEANS_VARIANTS+=,titerieee
[ $GRAM = 1 ] && KMEANS_VARIANTS+=,tgram
echo "kmeans variants: $KMEANS_VARIANTS" | tee "$OUT/kmeans_variants.txt"
pack
python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-rgb,cluster-embedding,cluster-mixed,kmeans --variants "$KMEANS_VARIANTS" \
  --kernels 8 --budget-s 190 2>&1 | quiet "$OUT/masking_op.log"
BEST=$(python3 - "$OUT/masking_op.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
kmeans = {r["variant"]: r["op_kernel_ms"] for r in rows if r["strategy"] == "kmeans" and r.get("op_kernel_ms")}
print(min((ms, name) for name, ms in kmeans.items())[1] if kmeans else "current")
PY
)
echo "kmeans' step as: $BEST" | tee "$OUT/best_variant.txt"
timeout 240 python3 bench/masking.py --out "$OUT/masking_compiled_steps" --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-mixed,kmeans --interleave 3 --variants "$BEST" 2>&1 \
  | quiet "$OUT/masking_compiled_steps.log"
timeout $((520 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_train.py \
  tests/test_evaluate.py -m gpu 2>&1 | tee "$OUT/gpu_tests_full.txt" | tail -4 | tee "$OUT/gpu_tests.txt"
pack
if [ "$SECONDS" -lt 480 ]; then
  timeout $((575 - SECONDS)) python3 bench/masking.py --out "$OUT/masking_eager_steps" --modes op-compiled \
    --ratios 0.5 --strategies random,cluster-rgb,cluster-mixed,kmeans --interleave 3 --variants "$BEST" 2>&1 \
    | quiet "$OUT/masking_eager_steps.log"
fi
