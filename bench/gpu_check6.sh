#!/usr/bin/env bash
# Third device call of 2026-11-27 (twelfth session; about 2 minutes): the eager side, which runs 4 and 5 did not
# measure: the step and the op (with its 4 costliest kernels) of random, cluster-rgb, cluster-embedding and
# kmeans at 0.5, then 0.3, eager. Rows are written as they come.
set -u
source bench/gpu_setup.sh
python3 bench/masking.py --out "$OUT/masking_eager" --modes eager --ratios 0.5,0.3 \
  --strategies random,cluster-rgb,cluster-embedding,kmeans --kernels 4 \
  --budget-s ${BUDGET_S:-130} 2>&1 | grep -v -i warn | tee "$OUT/masking_eager.log" | grep -v "^{"
