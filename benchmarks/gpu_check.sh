#!/usr/bin/env bash
# GPU check (issues 7 and 22): a few paper-profile AMP training steps of every branch, the
# baseline and the segmenter, then the ensemble's inference on the test images, within a global
# deadline (--minutes, default 3.5). Unattended on a fresh GPU machine: installs what it needs,
# writes OUT/gpu_check.json after every measured item (a run cut at any moment leaves every figure
# measured so far) and one progress line per item (also in OUT/gpu_check.log).
#
#   bash benchmarks/gpu_check.sh [--minutes 3.5] [--data DIR] [--out DIR] [gpu_check.py options]
#   bash benchmarks/gpu_check.sh --smoke          # no GPU: the same code paths, smoke profile, < 1 min
#   bash benchmarks/gpu_check.sh --setup-only     # install / pick the python, say which, stop
#   bash benchmarks/gpu_check.sh --fetch-wheels   # where pip reaches PyPI: .whl/ <- the wheels of
#                                                 # what the GPU image lacks (carry .whl there)
#
# OUT: --out, else $OUT (the device tool returns what is written there), else benchmarks/gpu/.
# Data: --data (a Kaggle-layout root), else tests/fixtures/sartorius_real.
#
# Setup (gpu_setup below; gpu_real.sh sources this file for it): `make setup` (.venv, pip
# install -e .), bounded by GPU_SETUP_TIMEOUT (300 s) with pip's network waits short. Where that
# fails (no package registry reachable: the lent GPU machines reach nothing outside), it falls
# back, and says so, to the first of .venv/bin/python, $PYTHON, python3 that imports torch;
# the packages that python lacks are installed from the wheels in .whl/ (no index) into
# build/gpu-site. A failed `make setup` is not tried again on the same machine (build/gpu_setup.failed)
# until pyproject.toml or the Makefile changes. GPU_SETUP=skip: no `make setup`, straight to that choice.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# what cellmask imports (faster_coco_eval or pycocotools: box AP; either does)
GPU_MODULES=${GPU_MODULES:-torch torchvision timm segmentation_models_pytorch ensemble_boxes numpy pandas cv2 matplotlib yaml tqdm packaging}
GPU_ONE_OF=${GPU_ONE_OF:-faster_coco_eval pycocotools}
# the distributions the lent GPU machines' python lacks (it has torch, torchvision, timm, opencv,
# numpy, pandas, matplotlib, pyyaml, tqdm, numba, huggingface-hub, safetensors)
GPU_WHEELS="segmentation-models-pytorch ensemble-boxes pycocotools faster-coco-eval"
GPU_WHEEL_DIR=${GPU_WHEEL_DIR:-.whl}      # wheels to install without an index where packages lack
GPU_BUILD=${GPU_BUILD:-build}             # the setup's log and failure marker (ignored by git)
GPU_SITE=${GPU_SITE:-$GPU_BUILD/gpu-site} # the wheels' install folder (put first on PYTHONPATH)

# The modules of GPU_MODULES (and one of GPU_ONE_OF) that python $1 cannot import, space-separated.
gpu_missing() {
    "$1" - "$GPU_MODULES" "$GPU_ONE_OF" <<'EOF' 2>/dev/null || echo "(python failed)"
import importlib.util
import sys

missing = [m for m in sys.argv[1].split() if importlib.util.find_spec(m) is None]
either = sys.argv[2].split()
if all(importlib.util.find_spec(m) is None for m in either):
    missing.append("|".join(either))
print(" ".join(missing))
EOF
}

# Sets PY and TORCH_INFO to the best python among "$@" that imports torch: one whose torch
# sees CUDA where nvidia-smi runs (a make setup that installed a CPU-only torch loses to the
# machine's own), then one that lacks no package, then the first.
gpu_pick() {
    local cand info score best=-1 want_cuda=0 seen=" "
    local probe='import torch; print("torch", torch.__version__, "with CUDA" if torch.cuda.is_available() else "without CUDA")'
    command -v nvidia-smi >/dev/null && want_cuda=1
    PY="" TORCH_INFO=""
    for cand in "$@"; do
        [[ -n $cand ]] && command -v "$cand" >/dev/null || continue
        cand=$(command -v "$cand")
        [[ $seen == *" $cand "* ]] && continue
        seen+="$cand "
        info=$("$cand" -c "$probe" 2>/dev/null) || continue
        score=0
        [[ $want_cuda == 1 && $info == *"with CUDA"* ]] && score=2
        [[ -z "$(gpu_missing "$cand")" ]] && score=$((score + 1))
        if ((score > best)); then
            PY=$cand TORCH_INFO=$info best=$score
        fi
    done
}

# Sets PY (the interpreter) and exports PYTHONPATH and CELLMASK_GPU_SETUP (what was done, for the
# JSON). Returns 3 when no python can run the scripts (the message says what is missing).
gpu_setup() {
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    mkdir -p "$GPU_BUILD"
    local log="$GPU_BUILD/gpu_setup.log" failed="$GPU_BUILD/gpu_setup.failed" rc=0 note missing
    if [[ "${GPU_SETUP:-make}" == skip ]]; then
        note="GPU_SETUP=skip: no make setup"
    elif [[ -f $failed && $failed -nt pyproject.toml && $failed -nt Makefile ]]; then
        rc=$(cat "$failed")
        echo "setup: make setup failed here before (exit $rc, $failed): not tried again (delete it to retry)"
        note="make setup FAILED earlier (exit $rc)"
    else
        echo "setup: make setup (.venv + pip install -e .; at most ${GPU_SETUP_TIMEOUT:-300} s) ..."
        if command -v make >/dev/null; then
            PIP_DEFAULT_TIMEOUT=${PIP_DEFAULT_TIMEOUT:-10} PIP_RETRIES=${PIP_RETRIES:-1} \
                timeout "${GPU_SETUP_TIMEOUT:-300}" make -s setup ${PYTHON:+PYTHON="$PYTHON"} \
                >"$log" 2>&1 || rc=$?
        else
            echo "make: not found" >"$log"
            rc=127
        fi
        if [[ $rc == 0 ]]; then
            rm -f "$failed"
            note="make setup: done"
        else
            echo "$rc" >"$failed"
            echo "setup: make setup FAILED (exit $rc; package registries unreachable?); the last lines of $log:"
            tail -n 4 "$log" | sed 's/^/    /'
            note="make setup FAILED (exit $rc)"
        fi
    fi
    gpu_pick .venv/bin/python "${PYTHON:-}" python3
    if [[ -z $PY ]]; then
        echo "setup: NO PYTHON WITH TORCH (tried .venv/bin/python, \$PYTHON, python3): cannot run"
        return 3
    fi
    if [[ $rc == 0 && $note == "make setup: done" && $PY == "$(command -v .venv/bin/python)" ]]; then
        note="make setup: .venv"
    else
        note="$note: FALLBACK to the python $PY"
        echo "setup: FALLING BACK to the python $PY (the best of .venv/bin/python, \$PYTHON, python3 with torch)"
    fi
    missing=$(gpu_missing "$PY")
    if [[ -n $missing ]] && compgen -G "$GPU_WHEEL_DIR/*.whl" >/dev/null; then
        echo "setup: $PY lacks: $missing -- installing the wheels of $GPU_WHEEL_DIR (no index) into $GPU_SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$GPU_SITE" \
            "$GPU_WHEEL_DIR"/*.whl 2>&1 | tail -n 3 || true
        export PYTHONPATH="$(cd "$GPU_SITE" 2>/dev/null && pwd || echo "$GPU_SITE"):$PYTHONPATH"
        note="$note + the wheels of $GPU_WHEEL_DIR: $(cd "$GPU_WHEEL_DIR" && ls -- *.whl | tr '\n' ' ')"
        missing=$(gpu_missing "$PY")
    fi
    if [[ -n $missing ]]; then
        echo "setup: $PY CANNOT RUN the scripts: missing $missing."
        echo "  Where pip reaches PyPI: bash benchmarks/gpu_check.sh --fetch-wheels, then carry $GPU_WHEEL_DIR"
        return 3
    fi
    export CELLMASK_GPU_SETUP="$note; $TORCH_INFO"
    echo "setup: $CELLMASK_GPU_SETUP"
}

# Downloads the wheels of GPU_WHEELS (the versions installed in .venv, else the newest) for the
# GPU image's python (GPU_PY_VERSION, 3.12) into .whl/ (ignored by git; the device tool's carry).
gpu_fetch_wheels() {
    local py=.venv/bin/python specs=() dist version
    [[ -x $py ]] || py=python3
    for dist in $GPU_WHEELS; do
        version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist" 2>/dev/null || true)
        specs+=("$dist${version:+==$version}")
    done
    mkdir -p "$GPU_WHEEL_DIR"
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PY_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$GPU_WHEEL_DIR" "${specs[@]}"
    ls -l "$GPU_WHEEL_DIR"
    echo "fetched ${specs[*]}: name $GPU_WHEEL_DIR in the device run's carry"
}

# gpu_main NAME DEFAULT_MINUTES ARGS...: setup, then benchmarks/NAME.py ARGS under a backstop
# timeout (--minutes plus a minute) in case the driver's own deadline cannot act (a hung kernel).
gpu_main() {
    local name=$1 minutes=$2 setup_only=0 given="" limit rc=0 prev="" arg
    shift 2
    local args=()
    for arg in "$@"; do
        case $arg in
            --fetch-wheels) gpu_fetch_wheels; return ;;
            --setup-only) setup_only=1 ;;
            --smoke) args+=("$arg"); minutes=0.75 ;;  # the driver's smoke default
            --minutes=*) args+=("$arg"); given=${arg#--minutes=} ;;
            *) args+=("$arg"); if [[ $prev == --minutes ]]; then given=$arg; fi ;;
        esac
        prev=$arg
    done
    minutes=${given:-$minutes}
    if awk -v m="$minutes" 'BEGIN { exit !(m > 9) }'; then
        echo "$name: WARNING: --minutes $minutes: with the backstop's minute it passes a lent machine's 10-minute command limit"
    fi
    gpu_setup || return $?
    if ((setup_only)); then
        echo "setup only: python $PY"
        return 0
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    limit=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 + 60 }')
    echo "$name: $PY benchmarks/$name.py ${args[*]:-} (driver deadline ${minutes} min, backstop ${limit} s)"
    timeout --kill-after=15 "$limit" "$PY" "benchmarks/$name.py" ${args[@]+"${args[@]}"} || rc=$?
    if [[ $rc == 124 || $rc == 137 ]]; then
        echo "$name: stopped by the backstop timeout (${limit} s): the JSON holds every figure measured before"
    fi
    return $rc
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    gpu_main gpu_check 3.5 "$@"
fi
