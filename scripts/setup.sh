#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the CPU build of torch installed FIRST (an open
# torch requirement would otherwise pull a multi-GB CUDA build), then moe-env with its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev,peers,ray]"  # ray: ~15 s here, runs the Ray tests
echo "moe-env installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
