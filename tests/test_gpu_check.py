"""benchmarks/gpu_check.py and gpu_check.sh on a CPU: the smoke profile through every code path
the lent GPU run takes (training steps of each model, the ensemble image by image), the JSON
written after every item (valid when the run is killed after its first one), the global deadline
(a tiny budget skips for time), and the setup's fallback when `make setup` fails."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def _gpu_check(monkeypatch):
    """The script as a module; its folder on ``sys.path`` for the test, as when it runs (its
    sibling ``gpu_common`` imports)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    if "gpu_check" in sys.modules:
        return sys.modules["gpu_check"]
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    pythonpath = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return {**env, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@pytest.mark.slow
def test_gpu_check_smoke_measures_every_model_and_the_ensemble(tmp_path: Path, monkeypatch):
    gpu_check = _gpu_check(monkeypatch)
    out = tmp_path / "out"
    argv = ["--smoke", "--warmup", "1", "--steps", "2", "--infer-passes", "2"]
    assert gpu_check.main([*argv, "--out", str(out), "--work", str(tmp_path / "work")]) == 0

    result = json.loads((out / "gpu_check.json").read_text())
    assert (
        result["status"] == "complete"
        and result["finished"]
        and not result["skipped"]
        and not result["errors"]
    )
    assert result["profile"] == "smoke" and result["device"]["type"] == "cpu"
    assert [row["model"] for row in result["train"]] == gpu_check.MODELS
    for row in result["train"]:
        assert row["timed_steps"] == 2 and row["warmup_steps"] == 1 and row["steps_per_s"] > 0
        assert row["finite"] and row["peak_gb"] > 0 and not row["cut_for_time"]
        assert row["amp"] is False and row["amp_dtype"] is None  # autocast is CUDA-only
    inference = result["inference"]
    assert inference["passes_done"] == 2 and len(inference["image_s"]) == 2 * inference["images"] == 6
    assert inference["ms_per_image"] > 0 and inference["submission_ok"]
    assert len(inference["branches"]) == 4 and inference["stages_ms_per_image"]
    assert result["elapsed_s"] < result["budget_s"]
    assert not list(out.glob("*.tmp"))
    log = (out / "gpu_check.log").read_text().splitlines()
    assert len(log) >= 6 + 6 + 2  # the start, one line per model, per image, the summary, the end


@pytest.mark.slow
def test_gpu_check_json_is_valid_when_killed_after_the_first_item(tmp_path: Path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--minutes", "2", "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--work", str(tmp_path / "work"), "--warmup", "1", "--steps", "1"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    path, result = out / "gpu_check.json", {}
    try:
        give_up = time.monotonic() + 120
        while time.monotonic() < give_up and proc.poll() is None:
            if path.is_file():
                result = json.loads(path.read_text())  # always whole: written by a rename
                if result["train"]:
                    break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert result.get("train"), "the first model's figures never appeared"
    killed = json.loads(path.read_text())
    assert killed["status"] == "running" and "finished" not in killed
    assert killed["train"][0]["model"] == "faster_rcnn_swin_t" and killed["train"][0]["finite"]


def test_gpu_check_a_tiny_budget_skips_for_time(tmp_path: Path, monkeypatch):
    gpu_check = _gpu_check(monkeypatch)
    out = tmp_path / "out"
    start = time.monotonic()
    argv = ["--smoke", "--minutes", "0.005", "--warmup", "1", "--steps", "1"]
    assert gpu_check.main([*argv, "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    seconds = time.monotonic() - start

    result = json.loads((out / "gpu_check.json").read_text())
    assert result["status"].startswith("partial") and result["finished"] and not result["errors"]
    timed_out = [s["item"] for s in result["skipped"] if s["reason"] == "time"]
    assert len(result["train"]) <= 1 and len(timed_out) >= len(gpu_check.MODELS) - 1
    assert all(s["item"] in [*gpu_check.MODELS, "inference"] for s in result["skipped"])
    assert "inference" not in result  # it needs the segmenter, skipped for time
    assert seconds < 30  # at most one model's two steps past the 0.3 s budget


def _setup(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``gpu_check.sh --setup-only`` with a ``make`` that fails (no registry reachable)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "make").write_text("#!/bin/sh\necho 'pip: no route to the package index' >&2\nexit 2\n")
    (fake / "make").chmod(0o755)
    path = f"{fake}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--setup-only"],
        env=_env(PATH=path, PYTHON=sys.executable, GPU_BUILD=str(tmp_path / "build"), **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_gpu_check_sh_falls_back_to_a_python_with_torch_when_make_setup_fails(tmp_path: Path):
    done = _setup(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "make setup FAILED (exit 2" in done.stdout and "FALLING BACK" in done.stdout
    assert "setup only: python " in done.stdout
    assert "no route to the package index" in (tmp_path / "build" / "gpu_setup.log").read_text()

    again = _setup(tmp_path)  # the same machine: not tried again while pyproject.toml is unchanged
    assert again.returncode == 0 and "make setup failed here before (exit 2" in again.stdout


@pytest.mark.slow
def test_gpu_check_sh_installs_the_carried_wheels_of_what_the_python_lacks(tmp_path: Path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    info = "gpu_check_probe-0.1.dist-info"
    with zipfile.ZipFile(wheels / "gpu_check_probe-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("gpu_check_probe.py", "VALUE = 1\n")
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n")
        whl.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        whl.writestr(
            f"{info}/RECORD", f"gpu_check_probe.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n"
        )
    site = tmp_path / "site"
    env = {"GPU_SETUP": "skip", "GPU_WHEEL_DIR": str(wheels), "GPU_SITE": str(site)}
    done = _setup(tmp_path, GPU_MODULES="torch gpu_check_probe", **env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lacks: gpu_check_probe" in done.stdout and (site / "gpu_check_probe.py").is_file()

    missing = _setup(tmp_path, GPU_MODULES="torch gpu_check_absent", **env)
    assert missing.returncode == 3 and "CANNOT RUN the scripts: missing gpu_check_absent" in missing.stdout


def test_gpu_check_signals_stop_the_run(tmp_path: Path, monkeypatch):
    gpu_check = _gpu_check(monkeypatch)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(gpu_check.Stopped, match="SIGTERM"), gpu_check.stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once
    assert signal.getsignal(signal.SIGTERM) is before
