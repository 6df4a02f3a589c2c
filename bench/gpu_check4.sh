#!/usr/bin/env bash
# Next device run (prepared 2026-11-27, eleventh session; about 8 minutes: give it timeout_s=590).
# 1. The masking op alone, compiled, at 0.5, with its 8 costliest kernels: the rgb similarity as it is now
#    (per-channel sums of the centred pixels, no division per pixel) against `previous` (the form measured on
#    the H200 on 2026-11-27: 0.61 ms of kernels, 0.9-1.0% of the step) and `bmm`, all in one process.
# 2. The compiled steps at 0.5 of random (the baseline) and cluster-rgb, both built first (about 100 s each on a
#    fresh machine), then timed in turn, 5 rounds of 20 steps, so that the drift between runs moves the ratio less
#    (on 2026-11-27 the same pair gave 1.011x and 1.087x in two runs one after the other).
# 3. The CUDA tests: no host sync, the halves, the rgb similarity against its definition on CUDA.
# The op's rows are written as they come, so a cut-off run keeps what it measured.
set -u
source bench/gpu_setup.sh
python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-rgb,cluster-embedding,kmeans --variants current,previous,bmm --kernels 8 \
  --budget-s ${OP_BUDGET_S:-100} 2>&1 | grep -v -i warn | tee "$OUT/masking_op.log" | grep -v "^{"
python3 bench/masking.py --out "$OUT/masking" --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-rgb --interleave ${ROUNDS:-5} 2>&1 | grep -v -i warn | tee "$OUT/masking.log" | grep -v "^{"
timeout 130 python3 -m pytest -q -p no:cacheprovider tests/test_masking.py \
  -k "no_host_sync or halves or rgb_similarity" 2>&1 | tail -4 | tee "$OUT/gpu_tests.txt"
