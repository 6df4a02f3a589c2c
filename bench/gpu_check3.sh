#!/usr/bin/env bash
# Next device run (prepared 2026-11-27, not yet run): compiled steps at 0.5 and 0.3 for random, cluster-rgb,
# cluster-embedding and kmeans, each with the op's kernel time from torch.profiler (the op's cost inside a
# step) and its time replayed as a CUDA graph, next to the CUDA-event time of a lone call; then the CUDA
# no-sync tests and the check that the compiled cluster similarity is fused into one pass over the pixels on
# CUDA too. The benchmark goes first: its rows are written as they come, so a cut-off run keeps them.
set -u
source bench/gpu_setup.sh
python3 bench/masking.py --out "$OUT/masking" --modes compiled --compile-ratios 0.5,0.3 \
  --strategies random,cluster-rgb,cluster-embedding,kmeans --budget-s ${BENCH_BUDGET_S:-300} 2>&1 | grep -v -i warn | tee "$OUT/masking.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_masking.py -k "no_host_sync or halves or compiled_rgb" 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"
