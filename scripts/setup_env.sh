#!/usr/bin/env bash
# Creates .venv (if missing) with the CPU build of torch 2.13, builds cpl_fast._C and installs
# cpl_fast editable with its test extras. Idempotent: re-running only rebuilds the extension.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel ninja
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${CPL_FAST_TORCH_VERSION:-2.13.0}"
# --no-build-isolation: the extension must be built against the torch installed above.
python -m pip install -q --no-build-isolation -e ".[test]"
python -m cpl_fast.cli.info
