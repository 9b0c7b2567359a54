#!/usr/bin/env bash
# GPU run on the real data: Faster R-CNN Swin-T, then the segmenter, each trained for a fixed
# wall-clock budget (paper profile, AMP on; train.max_hours), then that branch + the segmenter
# scored on held-out competition images (80/10/10 split). Prints steps, time per step, peak GPU
# memory and the held-out score overall and per class; writes OUT/gpu_real.json. About 8 minutes
# on one modern GPU with the default 3 minutes per model.
#   benchmarks/gpu_real.sh [--data ROOT] [--minutes 3] [--out DIR] [gpu_real.py options]
#   benchmarks/gpu_real.sh --profile smoke --device cpu --minutes 0.3 --data tests/fixtures/sartorius_real
# Data: --data, else $CELLMASK_DATA, else ../shared/sartorius (python -m cellmask.kaggle
# download-data fetches it). Installs nothing: run `make setup` first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# later options win: "$@" overrides these defaults
timeout "${GPU_REAL_TIMEOUT:-570}" "$PY" benchmarks/gpu_real.py --device cuda --profile paper "$@"
