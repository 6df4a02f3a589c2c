#!/usr/bin/env bash
# Ran 2026-12-04 as run 7 (bench/README.md). Its `padgram` variant has since become the library's `masking.gram`
# (and is gone from masking.py): to run it again, leave padgram out of stage 1.
# Prepared 2026-12-04 (twenty-second session, no GPU; stage 0 and the packing added in the twenty-third) for the next session with one; replaces gpu_check8.sh
# (prepared 2026-11-28, never run: no session since has had a GPU). At most about 9.5 minutes:
#   run(command="OUT=$OUT bash bench/gpu_check9.sh", carry=[".whl"], timeout_s=590)
# Each stage writes its rows as they come; the last runs only if time is left. What #4 still needs measured:
# 0. (Added 2026-12-04, twenty-third session, before its run.) k-means' Gram GEMM alone in several forms
#    (bench/gram.py): in run 5 it took 0.105 ms, 5x its FLOPs' time, in an sm80 kernel of cuBLAS.
# 1. The op alone at 0.5, compiled, with its 8 costliest kernels and its kernel count: kmeans now (bf16 features,
#    one bf16 GEMM) against `bf16pixels` (bf16 images, as a bf16 autocast step could hand the tower: conv1's
#    input unchanged, the pixels read in half the bytes), `padgram` (the Gram's patches padded to the multiple
#    that stage 0 found fastest), `bf16gram` (the Gram in bf16) and `pooled` (2 x 2-averaged pixels); random as
#    the anchor. Then cluster-rgb (0.290 ms in run 5, before its one-pass similarity) and cluster-mixed (never measured)
#    now, with bf16 pixels, and as `twopass` (the statistics' own pass over the pixels, as until 2026-11-28).
# 2. The op alone at 0.5 as `model.compile: false` runs it on a GPU (`op-compiled`: eager model, the op compiled
#    on its own), every strategy; eager, run 6 measured 0.2-1.7 ms.
# 3. The CUDA tests (`-m gpu`): no host sync, eager and compiled alone; the op compiled alone keeps what eager
#    keeps; k-means on the GPU as on the CPU (bf16 features); the rgb similarity against its definition; (new:) the
#    training batches come pinned; a run resumed at a checkpoint ends as one that went on, bit for bit, on the GPU
#    (only ever checked on a CPU); every evaluator on the GPU (clip_benchmark's CUDA linear probe: never run)
#    names the CPU's metrics. Then `h2d.py`: a batch copied from pageable memory (the loader until
#    2026-12-04) and from pinned memory (now) behind a 60 ms stand-in step: the GPU's idle share.
# 4. If under 8 minutes have gone: the steps at 0.5 of the eager model with the op compiled alone, in turn (3 rounds
#    of 20 steps).
# 5. If under 7 minutes have gone: the compiled steps at 0.5 of random, cluster-mixed and kmeans, in turn.
set -u
source bench/gpu_setup.sh  # sets OUT to a work folder, packed into $OUT/<script>.tgz: pack, quiet LOG
# k-means' Gram in each form (GEMM alone); the padgram variant then pads to the fastest multiple measured
timeout 60 python3 bench/gram.py --out "$OUT/gram" 2>&1 | grep -v -i warn; pack
export CLUSTERMASK_BENCH_GRAM_PAD=$(python3 -c "
import json; rows = json.load(open('$OUT/gram.json'))['rows']
padded = [r for r in rows if r['form'].startswith('padded')]
print(min(padded, key=lambda r: r['ms'])['form'].split()[5] if padded else 16)" 2>/dev/null || echo 16)
echo "padgram pads to a multiple of $CLUSTERMASK_BENCH_GRAM_PAD"
python3 bench/masking.py --out "$OUT/masking_op_kmeans" --op-only --modes compiled --compile-ratios 0.5 \
  --strategies random,kmeans --variants current,bf16pixels,padgram+bf16pixels,padgram,bf16gram,pooled+bf16pixels \
  --kernels 8 --budget-s 110 2>&1 | quiet "$OUT/masking_op_kmeans.log"
python3 bench/masking.py --out "$OUT/masking_op_rgb" --op-only --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-rgb,cluster-mixed --variants current,bf16pixels,twopass --kernels 8 \
  --budget-s 80 2>&1 | quiet "$OUT/masking_op_rgb.log"
python3 bench/masking.py --out "$OUT/masking_opcompiled" --op-only --modes op-compiled --ratios 0.5 \
  --strategies random,cluster-rgb,cluster-embedding,cluster-mixed,kmeans --kernels 4 \
  --budget-s 70 2>&1 | quiet "$OUT/masking_opcompiled.log"
# the evaluation tests where clip_benchmark imports (it needs scikit-learn, scipy and requests from the machine)
eval_tests=$(python3 -c "import clip_benchmark.metrics.linear_probe" 2>/dev/null && echo tests/test_evaluate.py)
echo "evaluation tests: ${eval_tests:-not run, clip_benchmark does not import}" | tee "$OUT/gpu_tests.txt"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_train.py $eval_tests -m gpu 2>&1 \
  | tee "$OUT/gpu_tests_full.txt" | tail -4 | tee -a "$OUT/gpu_tests.txt"
pack
timeout 60 python3 bench/h2d.py --out "$OUT/h2d" 2>&1 | tail -8
pack
# the steps only in the time left: the command's limit is 590 s, and what ran before is worth more
if [ "$SECONDS" -lt 480 ]; then
  timeout $((575 - SECONDS < 100 ? 575 - SECONDS : 100)) python3 bench/masking.py --out "$OUT/masking_eager_steps" \
    --modes op-compiled --ratios 0.5 --strategies random,cluster-rgb,cluster-embedding,kmeans --interleave 3 2>&1 \
    | quiet "$OUT/masking_eager_steps.log"
fi
if [ "$SECONDS" -lt 420 ]; then
  timeout $((575 - SECONDS)) python3 bench/masking.py --out "$OUT/masking_compiled_steps" --modes compiled \
    --compile-ratios 0.5 --strategies random,cluster-mixed,kmeans --interleave 3 2>&1 \
    | quiet "$OUT/masking_compiled_steps.log"
fi
