"""A Kaggle-style continuation on a real model: a smoke run of Faster R-CNN Swin-T on the real
fixture images, cut by ``train.max_hours`` after every step, each session continuing from the
previous session's run directory (``train_stage(resume_from=...)``, as a continuation kernel does
with the previous version's output), ends bit-exactly as the run trained in one go."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cellmask.engine import load_checkpoint
from cellmask.engine.history import read_rows_csv
from cellmask.kaggle.session import NotebookPaths, train_stage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGE = "faster_rcnn_swin_t"

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(real_root: Path, out: Path, hours: float | None, resume_from: Path | None = None) -> dict:
    paths = NotebookPaths(data=real_root, out=out, configs=CONFIGS)
    overrides = ["train.progress=false", "train.val_every=5"]
    if hours is not None:
        overrides.append(f"train.max_hours={hours}")
    return train_stage(
        paths, STAGE, "sartorius", profile="smoke", epochs=2, device="cpu", overrides=overrides,
        resume_from=resume_from,
    )  # fmt: skip


def test_a_smoke_run_cut_after_every_step_and_continued_equals_one_run(real_root: Path, tmp_path: Path):
    whole = _train(real_root, tmp_path / "whole", None)
    assert whole["stopped"] is None
    steps = len(read_rows_csv(whole["run_dir"] / "steps.csv"))

    previous, sessions = None, 0
    while True:  # each "kernel version" writes its own output folder, resuming the last one's
        sessions += 1
        torch.manual_seed(1000 + sessions)  # nothing may depend on the process's RNG
        result = _train(real_root, tmp_path / f"v{sessions}", 1e-9, previous)
        previous = result["run_dir"]
        if not result["stopped"]:
            break
    assert sessions == steps >= 3  # one step per session

    a, b = load_checkpoint(whole["run_dir"] / "last.pt"), load_checkpoint(previous / "last.pt")
    assert (b["epoch"], b["iteration"]) == (2, 0)
    assert a["model"].keys() == b["model"].keys()
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, differ[:5]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == steps
    for i, state in a["optimizer"]["state"].items():
        assert all(
            torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k]))
            for k, v in state.items()
        )
    losses = [r["loss"] for r in read_rows_csv(whole["run_dir"] / "steps.csv")]
    assert [r["loss"] for r in read_rows_csv(previous / "steps.csv")] == losses

    # the mistake: a continuation with EPOCHS at or below the epochs done trains nothing;
    # it stops before reading any data, with one message saying so (the run is left as it was)
    from cellmask.engine import ResumeError

    before = (previous / "last.pt").read_bytes()
    paths = NotebookPaths(data=real_root, out=tmp_path / "again", configs=CONFIGS)
    with pytest.raises(ResumeError, match=r"epochs 1 but last\.pt has 2 of 2 epochs done: .* trains nothing"):
        train_stage(
            paths, STAGE, "sartorius", profile="smoke", epochs=1, device="cpu",
            overrides=["train.progress=false", "train.val_every=5"], resume_from=previous,
        )  # fmt: skip
    assert (previous / "last.pt").read_bytes() == before
