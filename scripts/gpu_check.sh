#!/usr/bin/env bash
# On a machine with a CUDA device and torch already installed: the GPU tests, then the CUDA
# benchmark. Uses the python on PATH (or $PYTHON) and the checkout itself, so nothing is installed.
# Results go to benchmarks/results/, and also to $OUT when that is set.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-}
status=0
"$python" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv || true
log() { if [ -n "$out" ]; then tee -a "$out/$1"; else cat; fi; }
"$python" -m pytest -p no:cacheprovider -q -m gpu tests/ -ra 2>&1 | log gpu-tests.log \
    || status=1
"$python" -m pytest -p no:cacheprovider -q -x tests/test_healthy.py tests/test_stats.py 2>&1 \
    | tail -n 3 | log gpu-tests.log || status=1
# With $OUT, the table goes there after every model, so that a run cut short keeps what it measured.
"$python" benchmarks/overhead.py --device cuda ${out:+--output "$out/cuda-results.md"} \
    ${BENCH_ARGS:-} 2>&1 | log gpu-bench.log || status=1
exit $status
