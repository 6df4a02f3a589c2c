#!/usr/bin/env bash
# Prepared 2026-11-28 (thirteenth session, which had no GPU) for the next session with one; replaces
# gpu_check7.sh. At most about 9 minutes: run(command="OUT=$OUT bash bench/gpu_check8.sh", carry=[".whl"],
# timeout_s=590); each stage writes its rows as they come, the last runs only if time is left.
# What #4 still needs measured:
# 1. The op alone at 0.5, compiled, with its 8 costliest kernels: kmeans now (bf16 features: one bf16 GEMM, the
#    dot products never normalised in a pass of their own) against `split` (the fp32 features' Gram from two
#    GEMMs: 0.530 ms in run 5) and `pooled`; cluster-mixed (never measured: both similarities); random and
#    cluster-rgb (0.290 ms in run 5) as anchors. cluster-rgb and -mixed also as `twopass`: the rgb similarity
#    with its statistics' own pass over the pixels, as the library had it until 2026-11-28 (now one pass).
# 2. The op alone at 0.5 as `model.compile: false` now runs it on a GPU (`op-compiled`: eager model, the op
#    compiled on its own), every strategy; eager, run 6 measured 0.2-1.7 ms.
# 3. The CUDA tests (`-m gpu`): no host sync, eager and compiled alone; the op compiled alone keeps what eager
#    keeps; k-means on the GPU as on the CPU (now bf16 features); the rgb similarity against its definition.
# 4. The steps at 0.5 of the eager model with the op compiled alone, in turn (3 rounds of 20 steps).
# 5. If under 7 minutes have gone: the compiled steps at 0.5 of random, cluster-mixed and kmeans, in turn.
set -u
source bench/gpu_setup.sh
quiet() { grep -v -i warn | tee "$1" | grep -v "^{"; }
python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-rgb,cluster-mixed,kmeans --variants current,twopass,split,pooled --kernels 8 \
  --budget-s 130 2>&1 | quiet "$OUT/masking_op.log"
python3 bench/masking.py --out "$OUT/masking_opcompiled" --op-only --modes op-compiled --ratios 0.5 \
  --strategies random,cluster-rgb,cluster-embedding,cluster-mixed,kmeans --kernels 4 \
  --budget-s 70 2>&1 | quiet "$OUT/masking_opcompiled.log"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_masking.py -m gpu 2>&1 | tail -4 \
  | tee "$OUT/gpu_tests.txt"
timeout 100 python3 bench/masking.py --out "$OUT/masking_eager_steps" --modes op-compiled --ratios 0.5 \
  --strategies random,cluster-rgb,cluster-embedding,kmeans --interleave 3 2>&1 | quiet "$OUT/masking_eager_steps.log"
if [ "$SECONDS" -lt 420 ]; then
  timeout $((560 - SECONDS)) python3 bench/masking.py --out "$OUT/masking_compiled_steps" --modes compiled \
    --compile-ratios 0.5 --strategies random,cluster-mixed,kmeans --interleave 3 2>&1 \
    | quiet "$OUT/masking_compiled_steps.log"
fi
