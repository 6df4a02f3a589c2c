#!/usr/bin/env bash
# Second device run of 2026-11-27 (twelfth session; about 4 minutes): kmeans only, after run 4 found the
# iterations' fused sums over the (B, L, L) cosines 3x slower than a bmm (now a bmm).
# 1. The op alone, compiled, at 0.5, with its 8 costliest kernels: kmeans now, `previous` (Lloyd's form),
#    `bf16` (the Gram in one bf16 GEMM) and `pooled` (k-means on 2 x 2-averaged pixels); random, the baseline.
# 2. The CUDA tests of kmeans and the split Gram, and the no-sync tests.
set -u
source bench/gpu_setup.sh
python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled --compile-ratios 0.5 \
  --strategies random,kmeans --variants current,previous,bf16,pooled --kernels 8 \
  --budget-s ${OP_BUDGET_S:-150} 2>&1 | grep -v -i warn | tee "$OUT/masking_op.log" | grep -v "^{"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_masking.py \
  -k "no_host_sync or gram or kmeans_on_gpu" 2>&1 | tail -4 | tee "$OUT/gpu_tests.txt"
