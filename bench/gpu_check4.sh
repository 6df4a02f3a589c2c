#!/usr/bin/env bash
# Run on 2026-11-27 (twelfth session, H200: results/*_h200_run4*; about 7 minutes: give it timeout_s=590).
# 1. The masking op alone, compiled, at 0.5, with its 8 costliest kernels, all in one process:
#    - cluster-rgb as it is now (per-channel sums of the centred pixels, no division per pixel) against
#      `previous` (measured on the H200 on 2026-11-27: 0.61 ms of kernels, 0.9-1.0% of the step) and `bmm`;
#    - kmeans as it is now (iterations on the (B, L, L) cosines from two bf16 GEMMs) against `previous`
#      (Lloyd's form on the (B, L, D) features: 0.62 ms, 1%) and `bmm`;
#    - random, the baseline.
# 2. The compiled steps at 0.5 of random (the baseline) and cluster-rgb, both built first (about 100 s each on a
#    fresh machine), then timed in turn, 5 rounds of 20 steps, so that the drift between runs moves the ratio less
#    (on 2026-11-27 the same pair gave 1.011x and 1.087x in two runs one after the other).
# 3. The CUDA tests: no host sync, the halves, the rgb similarity against its definition, the split Gram's
#    precision and k-means on the GPU against the CPU.
# The op's rows are written as they come, so a cut-off run keeps what it measured.
set -u
source bench/gpu_setup.sh
python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-rgb,kmeans --variants current,previous,bmm --kernels 8 \
  --budget-s ${OP_BUDGET_S:-200} 2>&1 | grep -v -i warn | tee "$OUT/masking_op.log" | grep -v "^{"
python3 bench/masking.py --out "$OUT/masking" --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-rgb --interleave ${ROUNDS:-5} 2>&1 | grep -v -i warn | tee "$OUT/masking.log" | grep -v "^{"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_masking.py \
  -k "no_host_sync or halves or rgb_similarity or gram or kmeans_on_gpu" 2>&1 | tail -4 | tee "$OUT/gpu_tests.txt"
