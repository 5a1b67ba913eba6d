#!/usr/bin/env bash
# The GPU check of the runtime (issue 14), one prepared script for a machine with CUDA and no network:
# the tiny random-initialised pipeline runs end to end with `device: auto`, and every stage of its
# manifest must record a CUDA device (STRATOS_EXPECT_DEVICE=cuda turns "auto gave the CPU" into a
# failure). Needs the venv of scripts/setup.sh with a CUDA build of torch; downloads nothing.
# Usage: bash scripts/gpu_check.sh            (about a minute after start-up)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
print("CUDA:", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
PY
export STRATOS_EXPECT_DEVICE=cuda HF_HUB_OFFLINE=1
"$PY" -m pytest -q -p no:cacheprovider \
  tests/test_runtime.py
