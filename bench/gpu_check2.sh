#!/usr/bin/env bash
# Second device run: the CUDA no-sync tests, then compiled steps for every strategy at 0.5 (random rerun as baseline).
set -u
source bench/gpu_setup.sh
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_masking.py -k "no_host_sync or halves" 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"
python3 bench/masking.py --out "$OUT/masking" --modes compiled --compile-ratios 0.5 --strategies random,cluster-rgb,cluster-embedding,kmeans --budget-s ${BENCH_BUDGET_S:-170} 2>&1 | grep -v -i warn | tee "$OUT/masking.log"
