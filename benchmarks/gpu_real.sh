#!/usr/bin/env bash
# GPU run on real images (issues 7 and 22): Faster R-CNN Swin-T, then the segmenter, trained
# within a global deadline (--minutes, default 4.5: training, bounded validations and scoring
# together; paper profile, AMP on), then that branch + the segmenter scored on held-out images,
# overall and per cell type. Unattended on a fresh GPU machine: installs what it needs (as
# gpu_check.sh: `make setup`, else the system python and the wheels of .whl/), writes
# OUT/gpu_real.json after every item (a run cut at any moment leaves every figure measured so far)
# and one progress line per item (also in OUT/gpu_real.log).
#
#   bash benchmarks/gpu_real.sh [--minutes 4.5] [--data DIR] [--out DIR] [gpu_real.py options]
#   bash benchmarks/gpu_real.sh --smoke          # no GPU: the same code paths, smoke profile, < 1 min
#   bash benchmarks/gpu_real.sh --setup-only     # install / pick the python, say which, stop
#
# Data: --data (a Kaggle-layout root), else tests/fixtures/sartorius_real (6 annotated images:
# 4 train / 1 val / 1 held out). OUT: --out, else $OUT, else benchmarks/gpu/.
set -euo pipefail
# shellcheck source=benchmarks/gpu_check.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_check.sh"  # gpu_setup, gpu_main (and cd to the repository)
gpu_main gpu_real 4.5 "$@"
