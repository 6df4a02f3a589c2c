#!/usr/bin/env bash
# Next device run (prepared 2026-11-27, not yet run; about 9 minutes: give it timeout_s=590): compiled
# steps at 0.5 and 0.3 for random, cluster-rgb, cluster-embedding and kmeans, each with the op's kernel time
# from torch.profiler (the op's cost inside a step) and its time replayed as a CUDA graph, next to the
# CUDA-event time of a lone call; then the CUDA no-sync tests and the check that the compiled cluster
# similarity is fused into one pass over the pixels on CUDA too; then the op's memory traffic as inductor
# counts it for Triton. The benchmark goes first: its rows are written as they come, so a cut-off run keeps
# them.
set -u
source bench/gpu_setup.sh
python3 bench/masking.py --out "$OUT/masking" --modes compiled --compile-ratios 0.5,0.3 \
  --strategies random,cluster-rgb,cluster-embedding,kmeans --budget-s ${BENCH_BUDGET_S:-300} 2>&1 | grep -v -i warn | tee "$OUT/masking.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_masking.py -k "no_host_sync or halves or compiled_rgb" 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"
# last, as it is the one to lose if time runs out: the op's memory traffic as inductor counts it for Triton's
# kernels, to compare with the count taken on the CPU (bench/results/masking_traffic.md)
timeout 60 python3 bench/masking_traffic.py --device cuda --ratios 0.5 \
  --strategies random,cluster-rgb,cluster-embedding,kmeans \
  --out "$OUT/masking_traffic" 2>&1 | grep -v -i warn | tail -8
