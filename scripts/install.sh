#!/usr/bin/env bash
# Installs aphro, its server (the serve extra) and its test tools into the current Python. On a
# machine without an NVIDIA GPU it first installs the CPU build of torch 2.13.0 (a plain `torch`
# requirement would pull a multi-GB CUDA build); where torch is already importable it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
"$PY" -m pip install -q -e ".[dev,serve]"
