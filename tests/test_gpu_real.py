"""benchmarks/gpu_real.py end to end on a CPU: the smoke profile on the real fixture images, the
branch and the segmenter trained within the run's global deadline (bounded validations counted),
the branch + segmenter scored on the held-out image; the JSON holds the figures, a tiny budget
skips for time, and SIGTERM leaves a finished JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_real.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def _gpu_real():
    spec = importlib.util.spec_from_file_location("gpu_real", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_real_smoke_on_the_cpu_writes_its_figures(tmp_path: Path, real_root: Path):
    out, minutes = tmp_path / "out", 0.4
    argv = ["--smoke", "--minutes", str(minutes), "--data", str(real_root), "--work", str(tmp_path / "work")]
    assert _gpu_real().main([*argv, "--out", str(out)]) == 0

    result = json.loads((out / "gpu_real.json").read_text())
    assert (
        result["status"] == "complete"
        and result["finished"]
        and not result["skipped"]
        and not result["errors"]
    )
    assert result["split"] == {"train": 4, "val": 1, "holdout": 1}  # 6 images: fractions raised
    assert [row["model"] for row in result["train"]] == ["faster_rcnn_swin_t", "segmenter_upernet_swin_t"]
    for row in result["train"]:
        assert row["steps"] >= 1 and row["s_per_step"] > 0 and row["peak_gb"] > 0 and row["finite"]
        assert row["validations"] >= 1 and row["val_images"] == 1 and row["val_s"] > 0
        assert row["train_images"] == 4 and row["repeat"] == 25  # 50 steps an epoch at batch 2
        assert 0 < row["budget_s"] < minutes * 60 and row["amp_dtype"] is None
        assert (Path(row["run_dir"]) / "last.pt").is_file() and (Path(row["run_dir"]) / "best.pt").is_file()
    holdout = result["holdout"]
    assert 0.0 <= holdout["score"] <= 1.0 and holdout["n_images"] == 1 and holdout["images_planned"] == 1
    assert {"shsy5y", "cort", "astro"} <= set(holdout["per_class"])
    assert sum(holdout["class_counts"].values()) == 1
    assert result["elapsed_s"] < minutes * 60 + 10  # the deadline, give or take the last step
    assert (out / "gpu_real.log").read_text().count("\n") >= 5


def test_gpu_real_a_tiny_budget_skips_for_time(tmp_path: Path, real_root: Path):
    out = tmp_path / "out"
    argv = ["--smoke", "--minutes", "0.01", "--data", str(real_root), "--work", str(tmp_path / "work")]
    assert _gpu_real().main([*argv, "--out", str(out)]) == 0

    result = json.loads((out / "gpu_real.json").read_text())
    assert result["status"].startswith("partial") and result["finished"] and not result["errors"]
    assert result["split"] == {"train": 4, "val": 1, "holdout": 1} and result["train"] == []
    reasons = {s["item"]: s["reason"] for s in result["skipped"]}
    assert reasons == {
        "faster_rcnn_swin_t": "time",
        "segmenter_upernet_swin_t": "time",
        "holdout scoring": "missing runs",
    }
    assert result["holdout"] is None and result["elapsed_s"] < 10


@pytest.mark.slow
def test_gpu_real_sigterm_leaves_a_finished_json(tmp_path: Path, real_root: Path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    argv = ["--smoke", "--minutes", "2", "--data", str(real_root), "--work", str(tmp_path / "work")]
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    path = out / "gpu_real.json"
    try:
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up and proc.poll() is None:
            if path.is_file() and json.loads(path.read_text()).get("split"):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 124
    finally:
        proc.kill()
        proc.wait()
    result = json.loads(path.read_text())
    assert result["status"] == "interrupted: SIGTERM" and result["finished"]
    assert result["split"] == {"train": 4, "val": 1, "holdout": 1}


def test_gpu_real_names_a_missing_data_root(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="download-data"):
        _gpu_real().data_root(str(tmp_path))


def test_gpu_real_defaults_to_the_fixtures():
    assert _gpu_real().data_root(None) == (ROOT / "tests" / "fixtures" / "sartorius_real").resolve()
