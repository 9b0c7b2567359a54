"""The wall-clock budget ``train.max_hours``: a run stops after the step that passes it, with the
cut epoch validated, saved and marked; a resume continues; null / 0 mean no budget; a bad value
is an error naming the key; under DDP every rank stops after the same step.

The toys live in tests/engine_toys.py; the rest of the engine: tests/test_engine*.py.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
from engine_toys import StepModel, TinyDetector, ToyDataset, batches, make_val_fn, tiny_cfg

from cellmask.engine import (
    WallClockBudget,
    build_train_loader,
    cleanup_distributed,
    fit,
    init_distributed,
    load_checkpoint,
    seed_everything,
)
from cellmask.engine.history import read_rows_csv

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = 1e-9  # hours: spent by the time the first step ends


def test_a_tiny_budget_stops_after_the_first_step_with_the_epoch_closed(tmp_path: Path):
    data = ToyDataset(n=6)  # 3 iterations an epoch
    cfg = tiny_cfg(epochs=3, max_hours=TINY, val_every=5)  # no epoch due for validation before 3
    seed_everything(0)
    result = fit(
        TinyDetector(4), build_train_loader(data, cfg), make_val_fn(data, cfg), cfg, tmp_path / "run"
    )

    assert result["stopped"] == "max_hours"
    [row] = result["history"]
    assert row["epoch"] == 1 and row["stopped"] == "max_hours" and row["iters"] == 1
    assert "val_AP" in row  # validated although val_every=5: best.pt must exist
    run = tmp_path / "run"
    for name in ("config.yaml", "last.pt", "best.pt", "epoch_001.pt", "metrics.csv", "metrics.png"):
        assert (run / name).is_file(), name
    assert [r["iteration"] for r in read_rows_csv(run / "steps.csv")] == ["0"]
    [csv_row] = read_rows_csv(run / "metrics.csv")
    assert csv_row["stopped"] == "max_hours" and csv_row["iters"] == "1"
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 1 and last["history"][0]["stopped"] == "max_hours"
    # the cut epoch counts as done: the schedule stands at the next epoch's first iteration
    assert last["scheduler"]["last_epoch"] == 3
    assert load_checkpoint(run / "best.pt")["epoch"] == 1


def test_a_resumed_run_gets_a_fresh_budget_and_continues(tmp_path: Path):
    data = batches([False, False, False])  # 3 iterations an epoch
    run = tmp_path / "run"
    first = fit(StepModel(), data, None, tiny_cfg(epochs=3, max_hours=TINY), run)
    assert first["stopped"] == "max_hours" and len(first["history"]) == 1

    again = fit(StepModel(), data, None, tiny_cfg(epochs=3, max_hours=TINY), run, resume=True)
    assert again["stopped"] == "max_hours"
    assert [(r["epoch"], r.get("stopped"), r.get("iters")) for r in again["history"]] == [
        (1, "max_hours", 1),
        (2, "max_hours", 1),
    ]

    done = fit(StepModel(), data, None, tiny_cfg(epochs=3, max_hours=None), run, resume=True)
    assert done["stopped"] is None
    assert [r["epoch"] for r in done["history"]] == [1, 2, 3] and "stopped" not in done["history"][2]
    assert [r["iteration"] for r in read_rows_csv(run / "steps.csv")] == ["0", "3", "6", "7", "8"]
    rows = read_rows_csv(run / "metrics.csv")
    assert [r["stopped"] for r in rows] == ["max_hours", "max_hours", ""]
    assert load_checkpoint(run / "last.pt")["epoch"] == 3


@pytest.mark.parametrize("hours", [None, 0, 0.0, 10.0])
def test_no_budget_or_an_ample_one_runs_every_epoch(tmp_path: Path, hours):
    result = fit(StepModel(), batches([False, False]), None, tiny_cfg(epochs=3, max_hours=hours), tmp_path)
    assert result["stopped"] is None
    assert [r["epoch"] for r in result["history"]] == [1, 2, 3]
    assert not any("stopped" in r or "iters" in r for r in result["history"])
    assert "stopped" not in read_rows_csv(tmp_path / "metrics.csv")[0]


@pytest.mark.parametrize("hours", [-1, -0.5, "soon", True, float("nan")])
def test_a_bad_budget_is_an_error_naming_the_key(tmp_path: Path, hours):
    with pytest.raises(ValueError, match=r"train\.max_hours"):
        fit(StepModel(), batches([False]), None, tiny_cfg(max_hours=hours), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_budget_passing_at_the_runs_last_step_is_no_stop(tmp_path: Path, monkeypatch):
    checks = {"n": 0, "passed_at": (2,)}  # the n-th check after a step; 2 iterations an epoch

    def passed(self, info=None):
        checks["n"] += 1
        return checks["n"] in checks["passed_at"]

    monkeypatch.setattr(WallClockBudget, "passed", passed)
    cut = fit(StepModel(), batches([False, False]), None, tiny_cfg(epochs=2, max_hours=1.0), tmp_path / "a")
    # passed at the end of epoch 1: a full epoch, but the run stops there all the same
    assert cut["stopped"] == "max_hours" and cut["history"][0]["iters"] == 2
    assert load_checkpoint(tmp_path / "a" / "last.pt")["scheduler"]["last_epoch"] == 2

    checks.update(n=0, passed_at=(4,))  # epoch 2's last step: the run is complete, not cut
    done = fit(StepModel(), batches([False, False]), None, tiny_cfg(epochs=2, max_hours=1.0), tmp_path / "b")
    assert done["stopped"] is None and not any("stopped" in r for r in done["history"])
    assert len(done["history"]) == 2


def test_budget_object():
    assert WallClockBudget.from_config(tiny_cfg(max_hours=None)) is None
    assert WallClockBudget.from_config({"train": {"max_hours": 0}}) is None
    budget = WallClockBudget.from_config({"train": {"max_hours": 2}})
    assert budget is not None and budget.seconds == 7200.0 and not budget.passed()
    assert WallClockBudget(1.0, start=time.monotonic() - 3601).passed()
    with pytest.raises(ValueError, match="max_hours > 0"):
        WallClockBudget(0)


# ---------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    # only rank 1's clock runs out (after its first step): rank 0 must stop with it, at that step
    cfg = tiny_cfg(epochs=2, batch_size=1, max_hours=TINY if rank == 1 else 100.0)
    data = [(torch.full((2,), float(i)), {"poison": False}) for i in range(8)]  # 4 iterations a rank
    loader = build_train_loader(data, cfg, None, info)
    model = StepModel()
    result = fit(model, loader, None, cfg, Path(out) / "run", device="cpu")
    torch.save(
        {"stopped": result["stopped"], "history": result["history"], "calls": model.calls},
        Path(out) / f"rank{rank}.pt",
    )
    cleanup_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_stop_after_the_same_step(tmp_path: Path):
    import torch.multiprocessing as mp

    context = mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish in 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["stopped"] for r in ranks] == ["max_hours", "max_hours"]
    assert [r["calls"] for r in ranks] == [1, 1]  # one step each, then both stopped
    assert [r["history"][0]["iters"] for r in ranks] == [1, 1]
    steps = read_rows_csv(tmp_path / "run" / "steps.csv")
    assert [(r["iteration"], r["rank"]) for r in steps] == [("0", "0"), ("0", "1")]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_a_fresh_run_in_a_used_directory_starts_its_steps_csv_over(tmp_path: Path):
    # what benchmarks/gpu_real.py counts steps from: a second fresh run must not append to the first's
    fit(StepModel(), batches([False, False]), None, tiny_cfg(epochs=2), tmp_path / "run")
    fit(StepModel(), batches([False, False]), None, tiny_cfg(epochs=1, max_hours=TINY), tmp_path / "run")
    assert [r["iteration"] for r in read_rows_csv(tmp_path / "run" / "steps.csv")] == ["0"]
