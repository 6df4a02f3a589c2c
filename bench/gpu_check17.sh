#!/usr/bin/env bash
# Run on 2026-12-04 (twenty-sixth session) as run 13 (122 s), right after gpu_check16.sh (run 12). The record of
# that run: it no longer runs as it is. clustermask/kmeans_kernels.py then held both kernels below; after the run
# the features' kernel became clustermask/features_kernel.py (on by default, its padding rows no longer zeroed:
# the fill took 0.024 ms) and the sums' kernel was removed (0.100 ms against cuBLAS's 0.080), with the `tfeat`,
# `tfeatflat` and `tsums` variants (`inductorfeat` is the features from inductor's kernel).
# clustermask/kmeans_kernels.py: k-means' features (each channel of a row of patches per program) and its
# iterations' sums over the clusters' members (64 rows of dot products per program) from Triton kernels.
# 1. The kernels' CUDA tests (bit-for-bit features, the sums against the bmm, k-means eager and compiled with
#    either kernel or both, no host sync).
# 2. The op alone, compiled, at 0.5: kmeans as the library has it and with the kernels (`tfeat`, `tfeatflat`:
#    each patch's values permuted in registers before the store or stored as loaded; `tsums`; and both).
set -u
source bench/gpu_setup.sh  # sets OUT to a work folder, packed into $OUT/<script>.tgz: pack, quiet LOG
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kmeans_kernels.py -m gpu 2>&1 \
  | tee "$OUT/gpu_tests_kernels_full.txt" | tail -4 | tee "$OUT/gpu_tests_kernels.txt"
pack
timeout $((235 - SECONDS)) python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled \
  --compile-ratios 0.5 --strategies kmeans --variants current,tfeat,tfeatflat,tsums,tfeat+tsums,tfeatflat+tsums \
  --kernels 8 --budget-s 130 2>&1 | quiet "$OUT/masking_op.log"
