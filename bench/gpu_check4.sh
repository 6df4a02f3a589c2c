#!/usr/bin/env bash
# Next device run (prepared 2026-11-27, eleventh session; about 8 minutes: give it timeout_s=590).
# 1. The masking op alone, compiled, at 0.5, with its 8 costliest kernels: the rgb similarity as it is now
#    (per-channel sums of the centred pixels, no division per pixel) against `previous` (the form measured on
#    the H200 on 2026-11-27: 0.61 ms of kernels, 0.9-1.0% of the step) and `bmm`, all in one process.
# 2. The compiled steps at 0.5: random (the baseline) and cluster-rgb, about 100 s each on a fresh machine
#    (STEP_BUDGET_S=250 to try cluster-embedding too).
# 3. The CUDA tests: no host sync, the halves, the rgb similarity against its definition on CUDA.
# Rows are written as they come, so a cut-off run keeps what it measured.
set -u
source bench/gpu_setup.sh
python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-rgb,cluster-embedding,kmeans --variants current,previous,bmm --kernels 8 \
  --budget-s ${OP_BUDGET_S:-100} 2>&1 | grep -v -i warn | tee "$OUT/masking_op.log" | grep -v "^{"
python3 bench/masking.py --out "$OUT/masking" --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-rgb,cluster-embedding,kmeans --budget-s ${STEP_BUDGET_S:-150} 2>&1 \
  | grep -v -i warn | tee "$OUT/masking.log" | grep -v "^{"
timeout 130 python3 -m pytest -q -p no:cacheprovider tests/test_masking.py \
  -k "no_host_sync or halves or rgb_similarity" 2>&1 | tail -4 | tee "$OUT/gpu_tests.txt"
