#!/usr/bin/env bash
# Create .venv (if missing) and install ZeroLLM into it; called by every Makefile target.
#   - a torch already importable by python3 (e.g. a cluster's CUDA build) is kept:
#     the venv then sees the system site-packages;
#   - otherwise on a machine without an NVIDIA GPU, a CPU build of torch is installed
#     (a local wheel if pip can find one, else PyTorch's CPU index), never the
#     multi-GB CUDA build.
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: keeping the torch that $PY already has ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
pip="$VENV/bin/python -m pip"
$pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $pip install "torch>=2.4,<2.15"
  elif $pip download -q --no-index --no-deps -d "$VENV/.torch-probe" "$TORCH_SPEC" >/dev/null 2>&1; then
    # A local CPU wheel is reachable through pip's find-links: take it, deps from the index.
    $pip install -q "$TORCH_SPEC"
  else
    $pip install "$TORCH_SPEC" --index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple
  fi
  rm -rf "$VENV/.torch-probe"
fi
# DeepSpeed compiles its ops at first use; nothing to build at install time.
DS_BUILD_OPS=${DS_BUILD_OPS:-0} $pip install -q -e ".[dev]"
touch "$VENV/.zerollm-installed"
echo "bootstrap: $VENV ready (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
