#!/usr/bin/env bash
# Set-up: a virtual environment in .venv with clustermask and everything it needs.
#   bash launch/setup.sh            # venv + packages
#   bash launch/setup.sh --slurm    # ... and a local single-node SLURM for the integration tests, and
#                                   # pdflatex for the report's tables (root, apt)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  # a torch/torchvision pair that import together (CPU torch 2.13 with PyPI's torchvision does not)
  if [ "$(uname -m)" = "x86_64" ]; then
    $pip install -q torch==2.14.1 torchvision==0.29.1
  else
    $pip install -q torch==2.9.1 torchvision==0.24.1
  fi
fi
# on CI's Python 3.11 / x86_64, the versions CI passed with (launch/constraints.txt); the newest elsewhere
$pip install -q -e '.[test]' -c launch/constraints.txt
.venv/bin/python -c "import torch, open_clip, clip_benchmark, webdataset, mlflow, hydra, submitit; print('clustermask environment ready: torch', torch.__version__)"
if [ "${1:-}" = "--slurm" ]; then
  bash .ci/start_slurm.sh
  # pdflatex and booktabs, for the test that the report's LaTeX tables compile (about 50 MB from Debian)
  if ! command -v pdflatex >/dev/null || ! kpsewhich booktabs.sty >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends texlive-latex-base \
      texlive-latex-recommended >/dev/null
  fi
fi
