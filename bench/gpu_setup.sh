# Sourced by the gpu_check scripts, on the lent GPU machine from the repo root: the pure-Python wheels of
# .whl/ (open_clip, webdataset, ...) into /tmp/site, the environment, the output folder and its packing, and the
# GPU's name.
# .whl/ is git-ignored; make it here with: pip download --no-deps -d .whl open_clip_torch==3.3.0 ftfy wcwidth
#   webdataset==1.0.2 braceexpand pytest-timeout==2.4.0 clip-benchmark==1.6.2, and numpy 2.3.5 for the machine's
#   Python 3.12 (--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64; its own numpy 2.5
#   breaks clip_benchmark 1.6.2, as pyproject.toml says)   (then run(..., carry=[".whl"]))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .whl/*.whl | grep -v /numpy-) || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/numpy-*.whl 2>/dev/null || echo "no numpy wheel for this Python in .whl: its own numpy stays"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# the lent machine returns at most 8 files from $OUT: the scripts write into a work folder, packed into one archive,
# <script>.tgz, after each stage (`pack`, or a stage's output through `quiet LOG`) and when the script exits
BACK=${OUT:-bench/results}
mkdir -p "$BACK"
OUT=$(mktemp -d /tmp/gpu_check.XXXX)
pack() { tar czf "$BACK/$(basename "$0" .sh).tgz" -C "$OUT" .; }
quiet() { grep -v -i warn | tee "$1" | grep -v "^{"; pack; }  # the log kept whole; printed without warnings or JSON
trap pack EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
