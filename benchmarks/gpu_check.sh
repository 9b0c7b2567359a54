#!/usr/bin/env bash
# GPU check (issue 7): a few paper-profile training steps of every branch, the baseline and the
# segmenter with AMP on, then the ensemble's inference on the fixture test images; prints time per
# step, peak GPU memory and whether any loss was non-finite. About 5 minutes on one modern GPU.
#   benchmarks/gpu_check.sh [OUT_DIR]          (OUT_DIR keeps the runs and gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout "${GPU_CHECK_TIMEOUT:-540}" "$PY" benchmarks/gpu_check.py --device cuda --profile paper \
    --warmup 2 --steps 5 ${1:+--out "$1"}
