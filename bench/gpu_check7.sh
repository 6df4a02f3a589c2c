#!/usr/bin/env bash
# Prepared for the next session with a GPU (2026-11-27, twelfth session; about 5 minutes: timeout_s=420).
# What runs 4-6 left open for #4:
# 1. kmeans under 0.5% of the step? The op alone, compiled, at 0.5, with its 8 costliest kernels: kmeans now
#    (0.530 ms in run 5) against `bf16` (the Gram in one bf16 GEMM: 0.416 ms), `pooled` (now with the image's
#    statistics from every pixel and the 2 x 2 pooling in the pass that standardises) and `pooled-bf16`; random.
#    Each of these variants changes what k-means clusters on (precision or resolution): for its owner to decide.
# 2. The eager steps at 0.5 of random, cluster-rgb, cluster-embedding and kmeans, timed in turn (3 rounds of 20
#    steps): run 6 measured them one after the other and found 1.14-1.29x, against 0.97-1.04x on 2026-11-26.
set -u
source bench/gpu_setup.sh
python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled --compile-ratios 0.5 \
  --strategies random,kmeans --variants current,bf16,pooled,pooled-bf16 --kernels 8 \
  --budget-s ${OP_BUDGET_S:-150} 2>&1 | grep -v -i warn | tee "$OUT/masking_op.log" | grep -v "^{"
python3 bench/masking.py --out "$OUT/masking_eager" --modes eager --ratios 0.5 \
  --strategies random,cluster-rgb,cluster-embedding,kmeans --interleave ${ROUNDS:-3} 2>&1 | grep -v -i warn \
  | tee "$OUT/masking_eager.log" | grep -v "^{"
