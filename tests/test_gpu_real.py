"""benchmarks/gpu_real.py end to end on a CPU: the smoke profile on the real fixture images,
each model trained for a tiny wall-clock budget (so it stops after its first step), then the
branch + segmenter scored on the held-out image; the JSON holds the figures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _gpu_real():
    spec = importlib.util.spec_from_file_location("gpu_real", ROOT / "benchmarks" / "gpu_real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_real_smoke_on_the_cpu_writes_its_figures(tmp_path: Path, real_root: Path):
    gpu_real = _gpu_real()
    argv = ["--device", "cpu", "--profile", "smoke", "--minutes", "0.0001", "--data", str(real_root)]
    assert gpu_real.main([*argv, "--out", str(tmp_path)]) == 0

    result = json.loads((tmp_path / "gpu_real.json").read_text())
    assert {"device", "profile", "data", "minutes_per_model", "split", "train", "holdout", "total_s"} <= set(
        result
    )
    assert result["split"] == {"train": 4, "val": 1, "holdout": 1}  # 6 images: fractions raised
    assert [row["model"] for row in result["train"]] == ["faster_rcnn_swin_t", "segmenter_upernet_swin_t"]
    for row in result["train"]:
        assert row["stopped"] == "max_hours" and row["steps"] == 1 and row["epochs"] == 1
        assert row["s_per_step"] > 0 and row["peak_gb"] > 0 and row["finite"]
        assert (Path(row["run_dir"]) / "last.pt").is_file() and (Path(row["run_dir"]) / "best.pt").is_file()
    holdout = result["holdout"]
    assert 0.0 <= holdout["score"] <= 1.0 and holdout["n_images"] == 1
    assert {"shsy5y", "cort", "astro"} <= set(holdout["per_class"])
    assert (tmp_path / "holdout" / "score.json").is_file()


def test_gpu_real_names_a_missing_data_root(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="download-data"):
        _gpu_real().data_root(str(tmp_path))
