"""Both GPUs of a T4 x2 train one run: the notebooks' own launch path (``train_stage(processes=N)``,
:func:`cellmask.engine.launch.launch`) run with 2 CPU processes and gloo, on the real fixture
images with the smoke profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellmask.engine import load_checkpoint, read_status
from cellmask.engine.history import read_rows_csv
from cellmask.kaggle.session import NotebookPaths, default_processes, train_stage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.slow
def test_a_notebook_stage_trains_in_two_processes(real_root: Path, tmp_path: Path, capsys):
    paths = NotebookPaths(data=real_root, out=tmp_path, configs=CONFIGS)
    result = train_stage(
        paths, "faster_rcnn_swin_t", "sartorius", profile="smoke", epochs=1, device="cpu", processes=2,
        overrides=["train.progress=false", "train.batch_size=2"],
    )  # fmt: skip
    assert result["processes"] == 2 and "model" not in result  # rank 0's result, picklable
    run = result["run_dir"]
    assert read_status(run).finished
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["meta"]["world_size"] == 2
    assert ckpt["config"]["train"]["batch_size"] == 1  # the total of 2 split over the two processes
    ranks = {row["rank"] for row in read_rows_csv(run / "steps.csv")}
    assert ranks == {"0", "1"}  # both processes trained every step
    assert "DDP on 2 processes: train.batch_size 2 in all, 1 each" in capsys.readouterr().out
    assert default_processes("cpu") == 1
