#!/usr/bin/env bash
# Creates (or updates) the virtual environment in .venv with pinned packages.
#   bash scripts/setup.sh [EXTRAS]      e.g. "dev" or "dev,deepspeed"
# PyTorch: the CUDA build where an NVIDIA GPU is visible, the CPU build elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${MODMOE_VENV:-.venv}"
torch_version="2.13.0"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

installed=$("$venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
if [ "$installed" != "$torch_version" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing the CUDA build of torch $torch_version"
    "${pip[@]}" install -q "torch==$torch_version"
  else
    echo "setup: no GPU: installing the CPU build of torch $torch_version"
    # The CPU wheel index first (no CUDA downloads); where it is unreachable, pip's own
    # configuration (a local wheel, or PyPI) provides torch.
    "${pip[@]}" install -q --no-deps --retries 0 --timeout 15 \
        --index-url https://download.pytorch.org/whl/cpu "torch==$torch_version" 2>/dev/null \
      || "${pip[@]}" install -q --no-deps "torch==$torch_version"
  fi
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# DeepSpeed (the deepspeed extra): no C++/CUDA ops at install time; the few it needs are
# compiled on first use (g++ on CPU), which keeps the install independent of a CUDA toolkit.
export DS_BUILD_OPS="${DS_BUILD_OPS:-0}"
"${pip[@]}" install -q -c requirements/constraints.txt -e "$spec"
echo "setup: ready ($venv, torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'))"
