#!/usr/bin/env bash
# Creates .venv with everything gradwatch's demo and tests need. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# torch first and pinned, so that the range in pyproject.toml does not pull a CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
fi
modules="gradwatch, pytest, lightning, pytorch_lightning, transformers, accelerate, ruff, mypy"
if ! .venv/bin/python -c "import $modules" 2>/dev/null \
    || [ pyproject.toml -nt .venv/.gradwatch-installed ]; then
    .venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
    touch .venv/.gradwatch-installed
fi
