"""The wall-clock budget ``train.max_hours``: a run stops after the step that passes it, with the
cut epoch validated, saved and marked; a resume continues from the next batch and ends
bit-exactly as an uninterrupted run; null / 0 mean no budget; a bad value is an error naming the
key; under DDP every rank stops after the same step.

The toys live in tests/engine_toys.py; the rest of the engine: tests/test_engine*.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from engine_toys import StepModel, TinyDetector, ToyDataset, batches, make_val_fn, spawn_ranks, tiny_cfg

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
from cellmask.engine.launch import rank_env

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = 1e-9  # hours: spent by the time the first step ends


def test_a_tiny_budget_stops_after_the_first_step_and_saves_where_it_stands(tmp_path: Path):
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
    assert last["history"][0]["stopped"] == "max_hours"
    # no epoch complete, one iteration of the first done: the schedule stands after that step
    assert (last["epoch"], last["iteration"]) == (0, 1)
    assert last["scheduler"]["last_epoch"] == 1
    assert load_checkpoint(run / "best.pt")["epoch"] == 1


def test_a_resumed_run_gets_a_fresh_budget_and_continues_from_the_next_batch(tmp_path: Path):
    data = batches([False, False, False])  # 3 iterations an epoch (a plain list: no EpochSampler)
    run = tmp_path / "run"
    first = fit(StepModel(), data, None, tiny_cfg(epochs=3, max_hours=TINY), run)
    assert first["stopped"] == "max_hours" and len(first["history"]) == 1

    again = fit(StepModel(), data, None, tiny_cfg(epochs=3, max_hours=TINY), run, resume=True)
    assert again["stopped"] == "max_hours"
    # the cut row of epoch 1 is replaced by the resumed one, cut again after its 2nd iteration
    assert [
        (r["epoch"], r.get("stopped"), r.get("iters"), r.get("resumed_at")) for r in again["history"]
    ] == [
        (1, "max_hours", 2, 1),
    ]
    assert (load_checkpoint(run / "last.pt")["epoch"], load_checkpoint(run / "last.pt")["iteration"]) == (
        0,
        2,
    )

    done = fit(StepModel(), data, None, tiny_cfg(epochs=3, max_hours=None), run, resume=True)
    assert done["stopped"] is None
    assert [r["epoch"] for r in done["history"]] == [1, 2, 3] and "stopped" not in done["history"][2]
    # every iteration of the run once, none twice, none left out
    assert [r["iteration"] for r in read_rows_csv(run / "steps.csv")] == [str(i) for i in range(9)]
    rows = read_rows_csv(run / "metrics.csv")
    assert not any(r.get("stopped") for r in rows) and rows[0]["resumed_at"] == "2"
    last = load_checkpoint(run / "last.pt")
    assert (last["epoch"], last["iteration"]) == (3, 0) and last["scheduler"]["last_epoch"] == 9


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    last = load_checkpoint(run / "last.pt")
    state = {f"model.{k}": v for k, v in last["model"].items()}
    for i, s in last["optimizer"]["state"].items():
        state |= {f"optimizer.{i}.{k}": torch.as_tensor(v) for k, v in s.items()}
    state["scheduler.last_epoch"] = torch.tensor(last["scheduler"]["last_epoch"])
    return state


def test_a_run_cut_after_every_step_ends_bit_exactly_as_an_uninterrupted_one(tmp_path: Path):
    """Real loaders (EpochSampler, per-item seeded augmentation draws) and a model that draws from
    torch's RNG in every step: each session runs one step, then resumes; the weights, optimiser
    state and schedule at the end equal an uninterrupted run's, bit for bit."""
    data = ToyDataset(n=6)  # 3 iterations an epoch

    def session(run: Path, hours: float | None, resume: bool) -> dict:
        cfg = tiny_cfg(epochs=2, max_hours=hours, val_every=5)
        return fit(
            TinyDetector(4), build_train_loader(data, cfg), make_val_fn(data, cfg), cfg, run, resume=resume
        )

    seed_everything(0)
    whole = session(tmp_path / "whole", None, False)
    assert whole["stopped"] is None
    seed_everything(0)  # the same initial weights (the model is built before fit)
    sessions, result = 1, session(tmp_path / "cut", TINY, False)
    while result["stopped"]:
        seed_everything(123 + sessions)  # a resumed run must not depend on the process's RNG
        sessions, result = sessions + 1, session(tmp_path / "cut", TINY, True)
    assert sessions == 6  # 2 epochs x 3 iterations, one per session
    a, b = _final_state(tmp_path / "whole"), _final_state(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    losses = [r["loss"] for r in read_rows_csv(tmp_path / "whole" / "steps.csv")]
    assert [r["loss"] for r in read_rows_csv(tmp_path / "cut" / "steps.csv")] == losses


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
    last = load_checkpoint(tmp_path / "a" / "last.pt")
    assert (last["epoch"], last["iteration"], last["scheduler"]["last_epoch"]) == (1, 0, 2)

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
    os.environ.update(rank_env(rank, world, port))
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


def test_ddp_ranks_stop_after_the_same_step(tmp_path: Path):
    spawn_ranks(_ddp_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["stopped"] for r in ranks] == ["max_hours", "max_hours"]
    assert [r["calls"] for r in ranks] == [1, 1]  # one step each, then both stopped
    assert [r["history"][0]["iters"] for r in ranks] == [1, 1]
    steps = read_rows_csv(tmp_path / "run" / "steps.csv")
    assert [(r["iteration"], r["rank"]) for r in steps] == [("0", "0"), ("0", "1")]
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (last["epoch"], last["iteration"]) == (0, 1)


def test_a_fresh_run_in_a_used_directory_starts_its_steps_csv_over(tmp_path: Path):
    # what benchmarks/gpu_real.py counts steps from: a second fresh run must not append to the first's
    fit(StepModel(), batches([False, False]), None, tiny_cfg(epochs=2), tmp_path / "run")
    fit(StepModel(), batches([False, False]), None, tiny_cfg(epochs=1, max_hours=TINY), tmp_path / "run")
    assert [r["iteration"] for r in read_rows_csv(tmp_path / "run" / "steps.csv")] == ["0"]
