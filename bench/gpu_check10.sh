#!/usr/bin/env bash
# Ran 2026-12-04 as run 8 (bench/README.md). Its `embbmm` variant has since become the library's
# `masking.embedding_similarity` (the old form is `fusedemb`): to run it again, ask for fusedemb instead.
# Prepared 2026-12-04 (twenty-third session) after run 7 (gpu_check9.sh) on the same day, for the 350 s of device
# time left (at most about 4.5 minutes):
#   run(command="OUT=$OUT bash bench/gpu_check10.sh", carry=[".whl"], timeout_s=290)
# 1. bench/gram.py: k-means' Gram (the library's `masking.gram` now pads to a multiple of 8), the embedding
#    similarity's anchor dot products as GEMMs, one k-means iteration's bmm in three forms.
# 2. The op alone at 0.5, compiled: cluster-embedding and cluster-mixed now and as `embbmm` (their dot products
#    from one bf16 GEMM: the fused sums took 0.187 ms in run 7); kmeans now (padded Gram) and as `itert`.
# 3. The CUDA tests of the padded Gram and k-means, and the evaluation test with numpy 2.3 (.whl holds it: in
#    run 7 the machine's numpy 2.5 broke clip_benchmark 1.6.2's accuracy(), which pyproject.toml's numpy<2.4 avoids).
set -u
source bench/gpu_setup.sh  # sets OUT to a work folder, packed into $OUT/<script>.tgz: pack, quiet LOG
timeout 40 python3 bench/gram.py --out "$OUT/gram" 2>&1 | grep -v -i warn; pack
python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-embedding,cluster-mixed,kmeans --variants current,embbmm,itert --kernels 6 \
  --budget-s 120 2>&1 | quiet "$OUT/masking_op.log"
timeout $((270 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_evaluate.py -m gpu \
  -k "gram or kmeans or evaluator" 2>&1 | tee "$OUT/gpu_tests_full.txt" | tail -4 | tee "$OUT/gpu_tests.txt"
pack
