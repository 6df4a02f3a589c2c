#!/usr/bin/env bash
# Prepared 2026-12-04 (twenty-fourth session, which had no GPU) for the next session with one; at most about 9.5
# minutes:
#   run(command="OUT=$OUT bash bench/gpu_check12.sh", carry=[".whl"], timeout_s=590)
# .whl also holds numpy 2.3.5 for Python 3.12 (pyproject.toml's numpy<2.4; the machine's 2.5 breaks clip_benchmark).
# Replaces gpu_check11.sh (never run), with clustermask/gram_kernel.py: k-means' Gram from one Triton kernel that
# reads the pixels (never compiled for a GPU yet; checked on the CPU under Triton's interpreter only). Most needed
# first; each stage packs its results into $OUT/gpu_check12.tgz:
# 1. The kernel's own CUDA tests (its Gram against the library's, eager and compiled in k-means, no host sync).
# 2. The op alone at 0.5, compiled: every strategy as the library has it, and kmeans as `tgram`, `tgram128`,
#    `tgrampad` (the kernel's Gram in tiles of 64 or 128; padded to 200, with `paditer`'s iterations), `paditer`
#    and `pooled`.
# 3. The compiled steps at 0.5 of random, cluster-mixed and kmeans, in turn, kmeans with whichever of `current`,
#    `tgram` and `tgram128` had the fewest op kernel ms in stage 2 (`tgram*` only where stage 1 passed).
# 4. The other CUDA tests (`-m gpu`: test_masking, test_train, test_evaluate).
# 5. In the time left: the steps at 0.5 of the eager model with the op compiled alone, in turn.
set -u
source bench/gpu_setup.sh  # sets OUT to a work folder, packed into $OUT/<script>.tgz: pack, quiet LOG
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gram_kernel.py -m gpu 2>&1 \
  | tee "$OUT/gpu_tests_gram_kernel.txt" | tail -3
SUMMARY=$(tail -1 "$OUT/gpu_tests_gram_kernel.txt")
KERNEL_PASSED=$(echo "$SUMMARY" | grep " passed" | grep -q -v -E "failed|error" && echo 1 || echo 0)
pack
VARIANTS=current,paditer,pooled
[ "$KERNEL_PASSED" = 1 ] && VARIANTS=current,tgram128,tgram,tgrampad,paditer,pooled
python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-rgb,cluster-embedding,cluster-mixed,kmeans --variants "$VARIANTS" \
  --kernels 8 --budget-s 170 2>&1 | quiet "$OUT/masking_op.log"
BEST=$(python3 - "$OUT/masking_op.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
kmeans = {r["variant"]: r["op_kernel_ms"] for r in rows if r["strategy"] == "kmeans" and r.get("op_kernel_ms")}
print(min((ms, name) for name, ms in kmeans.items() if name in ("current", "tgram", "tgram128"))[1] if kmeans
      else "current")
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
