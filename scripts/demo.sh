#!/usr/bin/env bash
# Sets up .venv if needed, then trains small models with planted gradient bugs and prints what
# gradwatch finds. Extra arguments go to examples/planted_bugs.py (e.g. --log-dir DIR --steps N).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/planted_bugs.py "$@"
