#!/usr/bin/env bash
# Prepared 2026-12-04 (twenty-third session, after runs 7 and 8 that day) for the next session with a GPU; at most
# about 9.5 minutes:
#   run(command="OUT=$OUT bash bench/gpu_check11.sh", carry=[".whl"], timeout_s=590)
# .whl also holds numpy 2.3.5 for Python 3.12 (pyproject.toml's numpy<2.4; the machine's 2.5 breaks clip_benchmark).
# What #4 still needs measured, most needed first; each stage packs its results into $OUT/gpu_check11.tgz:
# 1. The op alone at 0.5, compiled: every strategy as the library has it now (the embedding similarity from a GEMM
#    and k-means' padded Gram: measured as variants in run 8), kmeans as `paditer` (its iterations on the padded
#    Gram) and `pooled` (2 x 2-averaged pixels, on the padded Gram).
# 2. The compiled steps at 0.5 of random, cluster-mixed and kmeans, in turn (never measured: cluster-mixed; kmeans
#    since run 3c). Then the CUDA tests (`-m gpu`: test_masking, test_train, test_evaluate).
# 3. In the time left: the steps at 0.5 of the eager model with the op compiled alone, in turn.
set -u
source bench/gpu_setup.sh  # sets OUT to a work folder, packed into $OUT/<script>.tgz: pack, quiet LOG
python3 bench/masking.py --out "$OUT/masking_op" --op-only --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-rgb,cluster-embedding,cluster-mixed,kmeans --variants current,paditer,pooled \
  --kernels 8 --budget-s 110 2>&1 | quiet "$OUT/masking_op.log"
timeout 230 python3 bench/masking.py --out "$OUT/masking_compiled_steps" --modes compiled --compile-ratios 0.5 \
  --strategies random,cluster-mixed,kmeans --interleave 3 2>&1 | quiet "$OUT/masking_compiled_steps.log"
timeout $((500 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_train.py \
  tests/test_evaluate.py -m gpu 2>&1 | tee "$OUT/gpu_tests_full.txt" | tail -4 | tee "$OUT/gpu_tests.txt"
pack
if [ "$SECONDS" -lt 470 ]; then
  timeout $((575 - SECONDS)) python3 bench/masking.py --out "$OUT/masking_eager_steps" --modes op-compiled \
    --ratios 0.5 --strategies random,cluster-rgb,cluster-mixed,kmeans --interleave 3 2>&1 \
    | quiet "$OUT/masking_eager_steps.log"
fi
