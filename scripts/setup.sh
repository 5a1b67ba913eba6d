#!/usr/bin/env bash
# Create .venv and install Stratos into it, CPU torch first so that pip never swaps it
# for a multi-GB CUDA build. Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION"
  .venv/bin/pip install -q "torch==$TORCH_VERSION"
fi
# The constraint keeps the torch just installed whatever other packages ask for.
echo "torch==$TORCH_VERSION" > .venv/torch-constraint.txt
echo "[setup] installing stratos and its dependencies"
.venv/bin/pip install -q -c .venv/torch-constraint.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import stratos, torch; print(f'[setup] stratos {stratos.__version__} ready (torch {torch.__version__})')"
