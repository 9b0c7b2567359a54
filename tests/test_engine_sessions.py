"""A run across sessions: a continuation that cannot lie (its config and epochs are the run's),
``status.json`` (finished or cut), the budget clock (a deadline and a reserve for the last
validation and save) and mixed precision chosen by the hardware."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from engine_toys import StepModel, batches, tiny_cfg

from cellmask.engine import ResumeError, fit, read_status
from cellmask.engine.amp import amp_dtype, needs_scaler
from cellmask.engine.loop import WallClockBudget
from cellmask.engine.status import RunStatus, config_differences, resume_problems, run_status

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _data():
    return batches([False] * 4)  # 4 finite steps an epoch


# ------------------------------------------------------------------------------ status.json


def test_a_finished_run_and_a_cut_one_say_so(tmp_path):
    done = fit(StepModel(), _data(), None, tiny_cfg(epochs=2), tmp_path / "done")
    assert done["status"] == RunStatus(True, 2, 2, 0, None, done["best"]["epoch"])
    assert read_status(tmp_path / "done") == done["status"]  # status.json
    fit(StepModel(), _data(), None, tiny_cfg(epochs=3, max_hours=1e-9), tmp_path / "cut")
    status = read_status(tmp_path / "cut")
    assert not status.finished and status.stopped == "max_hours" and status.epochs_planned == 3
    assert status.epochs_done == 0 and status.iteration == 1  # cut after its first step
    assert "0/3 epochs (cut: max_hours)" in status.describe()
    (tmp_path / "cut" / "status.json").unlink()  # an older run: told from metrics.csv + config.yaml
    assert read_status(tmp_path / "cut") == status


def test_run_status_from_rows():
    rows = [{"epoch": 1}, {"epoch": 2, "stopped": "max_hours", "iters": 7}]
    assert run_status(rows, 5, {"epoch": 1}) == RunStatus(False, 1, 5, 7, "max_hours", 1)
    assert run_status([{"epoch": 1}, {"epoch": 2}], 2, None).finished
    assert not run_status([{"epoch": 1}], 2, None).finished


# ------------------------------------------------------------------------------ continuations


def test_a_continuation_must_be_the_same_run(tmp_path):
    run = tmp_path / "run"
    fit(StepModel(), _data(), None, tiny_cfg(epochs=2), run)
    # EPOCHS at or below the epochs done: nothing would train; one message names it
    with pytest.raises(ResumeError, match=r"epochs 1 but last.pt has 2 of 2 epochs done: .* trains nothing"):
        fit(StepModel(), _data(), None, tiny_cfg(epochs=2), run, resume=True, epochs=1)
    # a changed config (not max_hours): named, key by key
    with pytest.raises(ResumeError, match=r"train\.lr: 0\.001 -> 0\.002; train\.seed: 0 -> 1"):
        fit(StepModel(), _data(), None, tiny_cfg(epochs=2, lr=2e-3, seed=1), run, resume=True)
    # a longer schedule only when asked, and then it trains the new epochs
    with pytest.raises(ResumeError, match=r"train\.epochs: 2 -> 3 \(a longer schedule: allowed with EXTEND"):
        fit(StepModel(), _data(), None, tiny_cfg(epochs=3), run, resume=True)
    more = fit(StepModel(), _data(), None, tiny_cfg(epochs=3, max_hours=5.0), run, resume=True, extend=True)
    assert [int(r["epoch"]) for r in more["history"]] == [1, 2, 3] and more["status"].finished


def test_resume_problems_and_differences():
    saved = {
        "train": {"epochs": 36, "lr": 1e-4, "max_hours": 11.0},
        "data": {"root": "/a"},
        "run": {"out_dir": "x"},
    }
    given = {
        "train": {"epochs": 36, "lr": 1e-4, "max_hours": 3.0},
        "data": {"root": "/b"},
        "run": {"out_dir": "y"},
    }
    assert resume_problems(saved, given, 12) == []  # the session's budget and places may change
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c: <unset> -> 2"]
    shorter = {**given, "train": {**given["train"], "epochs": 20}}
    assert resume_problems(saved, shorter, 12) == [
        "train.epochs: 36 -> 20 (a shorter schedule than the run's)"
    ]


def test_train_command_fails_a_bad_continuation_before_reading_data(tmp_path):
    """The notebooks' path: run_training checks config.yaml + status.json first (no data root
    needed), so a kernel stops in its first minute, not after loading LIVECell."""
    from cellmask.training.command import run_training

    run = tmp_path / "run"
    fit(StepModel(), _data(), None, tiny_cfg(epochs=2), run)
    with pytest.raises(ResumeError, match="epochs 1 but last.pt has 2 of 2 epochs done"):
        run_training(tiny_cfg(epochs=2), tmp_path / "no_data_here", "sartorius", run, resume=True, epochs=1)


# ------------------------------------------------------------------------------ the budget clock


def test_a_deadline_and_a_reserve_end_training_before_the_budget():
    now = time.time()
    assert WallClockBudget(deadline=now + 3600).passed() is False
    assert WallClockBudget(deadline=now + 60, reserve_s=120).passed() is True  # no room for val + save
    budget = WallClockBudget(max_hours=10.0, deadline=now + 100)
    assert budget.remaining() == pytest.approx(100, abs=2)  # the earlier of the two
    budget.reserve(30)
    budget.reserve(10)  # the reserve only grows
    assert budget.reserve_s == 30 and not budget.passed()
    assert WallClockBudget.from_config({"train": {"max_hours": None}}) is None
    cfg = WallClockBudget.from_config({"train": {"deadline": now + 10, "reserve_minutes": 1}})
    assert cfg.deadline == now + 10 and cfg.reserve_s == 60 and cfg.passed()


def test_fit_reserves_the_time_its_validation_took(tmp_path):
    def slow_val(model, epoch, info):
        time.sleep(0.3)
        return {"AP": 0.5}

    cfg = tiny_cfg(epochs=3, deadline=time.time() + 3600)
    out = fit(StepModel(), _data(), slow_val, cfg, tmp_path / "run")
    assert out["status"].finished
    # a deadline closer than the validation it measured: the first epoch is cut, its val still runs
    cfg = tiny_cfg(epochs=3, deadline=time.time() + 0.2, reserve_minutes=0)
    out = fit(StepModel(), _data(), slow_val, cfg, tmp_path / "tight")
    assert out["stopped"] == "max_hours" and "val_AP" in out["history"][-1]
    assert json.loads((tmp_path / "tight" / "status.json").read_text())["finished"] is False


# ------------------------------------------------------------------------------ mixed precision


def test_amp_dtype_by_hardware():
    assert amp_dtype("float16", "cuda") == torch.float16 and amp_dtype("bfloat16", "cpu") == torch.bfloat16
    expected = (
        torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    )
    assert amp_dtype("auto", "cuda") == expected and amp_dtype(None, "cuda") == expected
    assert amp_dtype("auto", "cpu") == torch.float16  # autocast is off on the CPU anyway
    with pytest.raises(ValueError, match="amp_dtype must be one of auto, float16, bfloat16"):
        amp_dtype("fp8", "cuda")
    assert needs_scaler(True, torch.float16, "cuda") and not needs_scaler(True, torch.bfloat16, "cuda")
    assert not needs_scaler(True, torch.float16, "cpu") and not needs_scaler(False, torch.float16, "cuda")


# ------------------------------------------------------------------------------ balanced sampling


def test_balanced_sampler_gives_each_type_its_share():
    from collections import Counter

    from cellmask.engine.loaders import BalancedSampler

    groups = ["cort"] * 30 + ["shsy5y"] * 6 + ["astro"] * 12
    uniform = BalancedSampler(groups, 0.0, seed=0)
    assert uniform.shares() == pytest.approx({"cort": 30 / 48, "shsy5y": 6 / 48, "astro": 12 / 48})
    even = BalancedSampler(groups, 1.0, seed=0)
    assert even.shares() == pytest.approx({"cort": 1 / 3, "shsy5y": 1 / 3, "astro": 1 / 3})
    counts = Counter()
    for epoch in range(20):
        even.set_epoch(epoch)
        drawn = list(even)
        assert len(drawn) == len(even) == 48
        counts.update(groups[i] for i in drawn)
    assert all(abs(counts[g] / 960 - 1 / 3) < 0.05 for g in ("cort", "shsy5y", "astro"))
    even.set_epoch(3)
    assert list(even) == list(even)  # deterministic in (seed, epoch)
    first = list(even)
    shsy = [i for i in first if groups[i] == "shsy5y"]
    assert len(set(shsy[:6])) == min(6, len(shsy))  # a shuffled cycle: every item before any twice
    halves = [BalancedSampler(groups, 1.0, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    for h in halves:
        h.set_epoch(3)
    assert sorted(list(halves[0]) + list(halves[1])) == sorted(first)  # two replicas share one draw
    with pytest.raises(ValueError, match="type_balance must be in"):
        BalancedSampler(groups, 1.5)


def test_the_detectors_and_segmenters_loaders_balance_the_types(real_records):
    """train.type_balance reaches the datasets the detectors and the segmenter train on."""
    from cellmask.config import load_config
    from cellmask.data.crops import CropDataset
    from cellmask.data.datasets import DetectionDataset
    from cellmask.engine.loaders import BalancedSampler, build_train_loader

    crops = load_config(ROOT / "configs" / "segmenter_upernet_swin_t.yaml", "smoke")["crops"]
    records = real_records[:4]  # shsy5y, astro, cort, cort
    for dataset in (DetectionDataset(records), CropDataset(records, crops, size=32, sampling_ratio=1)):
        assert dataset.item_groups() == [r.cell_type for r in records]
        loader = build_train_loader(dataset, tiny_cfg(type_balance=1.0))
        assert isinstance(loader.sampler.sampler, BalancedSampler)
        assert not isinstance(build_train_loader(dataset, tiny_cfg()).sampler.sampler, BalancedSampler)
