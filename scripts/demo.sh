#!/usr/bin/env bash
# Sets up .venv if needed, then runs `gradwatch demo`: small models with planted gradient bugs,
# what gradwatch finds in each, TensorBoard logs. Extra arguments go to it (--log-dir, --steps).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gradwatch demo "$@"
