#!/usr/bin/env bash
# One device run: CUDA checks (no host sync, compile, masking tests) and the masking benchmark.
# Run on the lent GPU machine from the repo root, with pure-Python wheels in .whl/ (see bench/README.md).
set -u
source bench/gpu_setup.sh
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_masking.py \
  -k "no_host_sync or compiles or exact_kept or attention or halves or bias or identity" 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python3 bench/masking.py --out "$OUT/masking" --budget-s ${BENCH_BUDGET_S:-330} 2>&1 | grep -v -i warn | tee "$OUT/masking.log"
