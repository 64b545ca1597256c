#!/usr/bin/env bash
# GPU validation in one call: build, GPU tests and GPU benchmarks, each phase under a time limit, the
# whole run inside 9 minutes on an H100/H200; results and logs in OUTPUT_DIR (default gpu_results/).
#   bash scripts/gpu_check.sh [--dry-run] [OUTPUT_DIR]
# --dry-run: the CPU rehearsal (what CI runs). The phases and their limits: scripts/gpu_check.py.
# Python: $PYTHON, else .venv/bin/python when there is one, else python3 (the GPU machine's).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
