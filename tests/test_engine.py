"""The training engine: schedules, optimiser, checkpoints and --init, the training step's
protocol (losses dict, non-finite guard, ``on_optimizer_step``), fit with bit-exact resume, and
the run directory (metrics.csv / steps.csv / metrics.png).

Loaders: tests/test_engine_data.py; DDP: tests/test_engine_ddp.py; validation and
``cellmask train``: tests/test_engine_train.py. The toys live in tests/engine_toys.py.
"""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_toys import (
    CLASS_PREFIX,
    StepModel,
    TinyDetector,
    ToyDataset,
    assert_same_weights,
    batches,
    make_val_fn,
    tiny_cfg,
)
from torch import nn

import cellmask.engine.epochs
from cellmask.engine import (
    CheckpointError,
    NonFiniteGuard,
    append_rows_csv,
    build_optimizer,
    build_scheduler,
    build_train_loader,
    fit,
    load_checkpoint,
    load_init_weights,
    lr_factor,
    metric_panels,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    train_one_epoch,
)
from cellmask.engine.history import keep_epochs_csv, read_rows_csv

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------- schedule


def test_cosine_schedule_with_warmup():
    kw = dict(
        kind="cosine",
        total_iters=100,
        iters_per_epoch=10,
        warmup_iters=10,
        warmup_ratio=0.1,
        min_lr_ratio=0.01,
    )
    assert lr_factor(0, **kw) == pytest.approx(0.1)  # warmup starts at warmup_ratio
    warm = [lr_factor(i, **kw) for i in range(11)]
    assert all(b > a for a, b in itertools.pairwise(warm))  # rises during warmup
    assert lr_factor(10, **kw) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.1)))
    after = [lr_factor(i, **kw) for i in range(10, 101)]
    assert all(b <= a for a, b in itertools.pairwise(after))  # then decays monotonically
    assert lr_factor(50, **kw) == pytest.approx(0.505)  # halfway: midpoint of 1 and 0.01
    assert lr_factor(100, **kw) == pytest.approx(0.01)  # end value = min_lr_ratio


def test_step_schedule_and_scheduler_object():
    model = nn.Linear(3, 2)
    cfg = tiny_cfg(
        optimizer="sgd", lr=0.1, scheduler="step", milestones=[2, 3], gamma=0.1, warmup_iters=0, epochs=4
    )
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    sched = build_scheduler(cfg, opt, iters_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[19] == pytest.approx(0.1)
    assert lrs[20] == pytest.approx(0.01) and lrs[29] == pytest.approx(0.01)
    assert lrs[30] == pytest.approx(0.001) and lrs[39] == pytest.approx(0.001)
    with pytest.raises(ValueError, match="scheduler"):
        build_scheduler(tiny_cfg(scheduler="poly"), opt, 10)


def test_adamw_groups_exempt_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=False))
    model[2].weight.requires_grad_(False)
    opt = build_optimizer(tiny_cfg(), model)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-2 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [model[0].weight.shape]  # frozen param left out
    assert len(no_decay["params"]) == 3  # conv bias, bn weight, bn bias
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(tiny_cfg(optimizer="lamb"), model)


# ------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_weights_only_rng_round_trip_and_errors(tmp_path: Path):
    seed_everything(3)
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())  # noqa: NPY002
    model = nn.Linear(2, 2)
    path = save_checkpoint(
        {"model": model.state_dict(), "rng": [state], "config": {"a": [1, 2]}}, tmp_path / "c.pt"
    )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain containers + tensors only
    assert ckpt["config"] == {"a": [1, 2]}
    seed_everything(99)
    set_rng_state(load_checkpoint(path)["rng"][0])
    again = (torch.rand(3), np.random.rand(3), __import__("random").random())  # noqa: NPY002
    assert (
        torch.equal(expected[0], again[0])
        and np.array_equal(expected[1], again[1])
        and expected[2] == again[2]
    )

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_checkpoint(bad)


def test_init_from_a_checkpoint_with_another_class_count(tmp_path: Path):
    torch.manual_seed(1)
    livecell = TinyDetector(num_classes=9)
    save_checkpoint({"model": livecell.state_dict(), "epoch": 3}, tmp_path / "livecell.pt")
    torch.manual_seed(2)
    competition = TinyDetector(num_classes=4)
    fresh = {k: v.clone() for k, v in competition.state_dict().items()}

    report = load_init_weights(competition, tmp_path / "livecell.pt")

    after, src = competition.state_dict(), livecell.state_dict()
    class_keys = {k for k in after if k.startswith(CLASS_PREFIX)}
    assert set(report.reinitialized) == class_keys  # cls_score and bbox_pred, weight and bias
    assert not report.missing and not report.unexpected
    for key, value in after.items():
        if key in class_keys:
            assert torch.equal(value, fresh[key]), key  # the fresh initialisation, right shape
            assert value.shape[0] in (4, 16)
        else:
            assert torch.equal(value, src[key]), key  # every other weight comes from LIVECell
    # same class count: everything loads, nothing re-initialised
    same = TinyDetector(num_classes=9)
    assert load_init_weights(same, {"model": livecell.state_dict()}).reinitialized == []
    assert_same_weights(same.state_dict(), livecell.state_dict())


class TwoCopies(nn.Module):
    """A student and a teacher of one architecture, both initialised from one plain checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Linear(3, 2)
        self.teacher = nn.Linear(3, 2)

    def map_init_state_dict(self, state):
        return {f"{who}.{k}": v for k, v in state.items() for who in ("student", "teacher")}


def test_init_goes_through_the_models_map_init_state_dict(tmp_path: Path):
    plain = nn.Linear(3, 2)
    save_checkpoint({"model": plain.state_dict()}, tmp_path / "plain.pt")
    model = TwoCopies()
    report = load_init_weights(model, tmp_path / "plain.pt")
    assert not report.missing and not report.unexpected and len(report.loaded) == 4
    for who in (model.student, model.teacher):
        assert_same_weights(who.state_dict(), plain.state_dict())


# ------------------------------------------------------------------------------ guard / protocol


def test_non_finite_loss_skips_the_step():
    model = StepModel()
    opt = build_optimizer(tiny_cfg(), model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_one_epoch(model, batches([True]), opt, cfg=tiny_cfg())
    assert model.calls == 1 and stats["skipped_steps"] == 1 and math.isnan(stats["loss"])
    assert_same_weights(model.state_dict(), before)  # the NaN step changed nothing

    stats = train_one_epoch(model, batches([False, True, False]), opt, cfg=tiny_cfg())
    assert stats["skipped_steps"] == 1 and stats["iters"] == 3 and math.isfinite(stats["loss"])
    assert not torch.equal(model.lin.weight, before["lin.weight"])
    assert all(torch.isfinite(p).all() for p in model.parameters())

    guard = NonFiniteGuard(max_consecutive=3)
    with pytest.raises(FloatingPointError, match="3 consecutive"):
        train_one_epoch(
            model, batches([True, True, False, True, True, True]), opt, cfg=tiny_cfg(), guard=guard
        )
    assert guard.skipped == 5


def test_only_loss_keys_are_summed_and_statistics_are_logged():
    cfg = tiny_cfg(optimizer="sgd", lr=0.1, weight_decay=0.0, grad_clip=0.0)
    model = StepModel(stats=True)
    reference = StepModel()
    reference.load_state_dict(model.state_dict())
    data = batches([False])
    opt = build_optimizer(cfg, model)
    steps: list[dict] = []
    stats = train_one_epoch(model, data, opt, cfg=cfg, steps=steps, start_iteration=7)

    reference.training_step(data[0])["loss_l2"].backward()  # the gradient of the loss alone
    expected = reference.lin.weight.detach() - 0.1 * reference.lin.weight.grad
    torch.testing.assert_close(model.lin.weight.detach(), expected, rtol=0, atol=1e-7)
    assert stats["boxes_per_image"] == 3.0 and stats["loss"] == pytest.approx(stats["loss_l2"])
    assert stats["weight_sum"] == pytest.approx(100 * float(reference.lin.weight.detach().sum()), rel=1e-5)
    (row,) = steps
    assert row["iteration"] == 7 and row["epoch"] == 1 and row["rank"] == 0 and row["skipped"] == 0
    assert row["lr"] == pytest.approx(0.1) and row["boxes_per_image"] == 3.0

    class NoLoss(StepModel):
        def training_step(self, batch):
            return {"pseudo_boxes": torch.tensor(1.0)}

    with pytest.raises(ValueError, match="no key starts with 'loss'"):
        train_one_epoch(NoLoss(), data, opt, cfg=cfg)


class Hooked(StepModel):
    """Records ``on_optimizer_step`` calls and whether the weights had changed by then."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []
        self.stepped: list[bool] = []
        self._before = self.lin.weight.detach().clone()

    def training_step(self, batch):
        self._before = self.lin.weight.detach().clone()
        return super().training_step(batch)

    def on_optimizer_step(self, iteration: int) -> None:
        self.seen.append(iteration)
        self.stepped.append(not torch.equal(self._before, self.lin.weight.detach()))


def test_on_optimizer_step_follows_every_step_taken_with_the_run_iteration(tmp_path: Path):
    model = Hooked()
    data = batches([False, True, False, False])  # iteration 1 (and 5) is skipped: NaN loss
    fit(model, data, None, tiny_cfg(epochs=2), tmp_path / "run", device="cpu")
    assert model.seen == [0, 2, 3, 4, 6, 7]
    assert all(model.stepped)  # called after the optimizer step, not before

    class Overflow(Hooked):  # a finite loss whose scaled gradients overflow: the AMP scaler skips
        def training_step(self, batch):
            return {"loss": self.lin.weight.sum() * 1e35}

    model = Overflow()
    opt = build_optimizer(tiny_cfg(), model)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    stats = train_one_epoch(model, batches([False]), opt, scaler=scaler, cfg=tiny_cfg())
    assert scaler.get_scale() < 65536.0 and stats["skipped_steps"] == 0  # an overflow, not a NaN loss
    assert model.seen == []


# ------------------------------------------------------------------------------------- fit / resume


def test_fit_resume_is_bit_exact_and_writes_the_run_dir(tmp_path: Path, monkeypatch):
    data = ToyDataset(n=6)
    cfg = tiny_cfg()

    seed_everything(0)
    straight = TinyDetector(4)
    full = fit(
        straight, build_train_loader(data, cfg), make_val_fn(data, cfg), cfg, tmp_path / "a", device="cpu"
    )

    seed_everything(0)
    first = TinyDetector(4)
    real_save = cellmask.engine.epochs.save_checkpoint

    def crash_saving_epoch_2(payload, path):  # epoch 2 trained, validated, steps.csv written
        if Path(path).name == "last.pt" and payload["epoch"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_save(payload, path)

    monkeypatch.setattr(cellmask.engine.epochs, "save_checkpoint", crash_saving_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(first, build_train_loader(data, cfg), make_val_fn(data, cfg), cfg, tmp_path / "b", device="cpu")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1

    seed_everything(123)  # a different initialisation and RNG state: resume must restore both
    resumed_model = TinyDetector(4)
    resumed = fit(
        resumed_model,
        build_train_loader(data, cfg),
        make_val_fn(data, cfg),
        cfg,
        tmp_path / "b",
        resume=True,
        device="cpu",
    )

    assert_same_weights(straight.state_dict(), resumed_model.state_dict())
    assert read_rows_csv(tmp_path / "a" / "steps.csv") == read_rows_csv(tmp_path / "b" / "steps.csv")
    assert len(read_rows_csv(tmp_path / "a" / "steps.csv")) == 2 * 3  # 2 epochs x 3 iterations
    drop = ("time_s",)
    strip = [{k: v for k, v in row.items() if k not in drop} for row in full["history"]]
    assert strip == [{k: v for k, v in row.items() if k not in drop} for row in resumed["history"]]

    run = tmp_path / "a"
    for name in (
        "config.yaml",
        "last.pt",
        "epoch_001.pt",
        "epoch_002.pt",
        "best.pt",
        "metrics.csv",
        "metrics.png",
    ):
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "config", "rng", "history", "best"} <= set(
        ckpt
    )
    assert ckpt["epoch"] == 2 and ckpt["config"]["train"]["epochs"] == 2
    assert_same_weights(ckpt["model"], straight.state_dict())
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert best["best"]["metric"] == "val_AP" and best["epoch"] == full["best"]["epoch"]
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "train_loss_classifier", "train_skipped_steps", "lr", "val_AP", "val_AP50"} <= set(
        rows[0]
    )
    assert all(0.0 <= float(r["val_AP50"]) <= 1.0 for r in rows)
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_statistics_reach_metrics_csv_and_their_own_panel(tmp_path: Path):
    result = fit(StepModel(stats=True), batches([False, True, False]), None, tiny_cfg(), tmp_path / "run")
    rows = read_rows_csv(tmp_path / "run" / "metrics.csv")
    assert {"train_weight_sum", "train_boxes_per_image", "train_loss_l2", "train_skipped_steps"} <= set(
        rows[0]
    )
    assert float(rows[0]["train_boxes_per_image"]) == 3.0
    assert result["history"][1]["train_skipped_steps"] == 1.0
    steps = read_rows_csv(tmp_path / "run" / "steps.csv")
    assert [r["skipped"] for r in steps] == ["0", "1", "0"] * 2 and [r["iteration"] for r in steps] == [
        str(i) for i in range(6)
    ]
    panels = dict(metric_panels(list(rows[0])))
    assert panels["training losses"] == ["train_loss_l2", "train_loss"]
    assert panels["training statistics"] == ["train_weight_sum", "train_boxes_per_image"]
    assert panels["learning rate"] == ["lr"]


def test_csv_rows_widen_and_a_resume_drops_later_epochs(tmp_path: Path):
    path = tmp_path / "steps.csv"
    append_rows_csv([{"epoch": 1, "loss": 1.0}], path)
    append_rows_csv([{"epoch": 2, "loss": 2.0}], path)
    append_rows_csv([{"epoch": 3, "loss": 3.0, "kept": 0.5}], path)  # a new column: header widened
    assert read_rows_csv(path) == [
        {"epoch": "1", "loss": "1.0", "kept": ""},
        {"epoch": "2", "loss": "2.0", "kept": ""},
        {"epoch": "3", "loss": "3.0", "kept": "0.5"},
    ]
    keep_epochs_csv(path, 1)
    assert [r["epoch"] for r in read_rows_csv(path)] == ["1"] and list(read_rows_csv(path)[0]) == [
        "epoch",
        "loss",
        "kept",
    ]


def test_fit_init_and_no_validation(tmp_path: Path):
    data = ToyDataset(n=4)
    cfg = tiny_cfg(epochs=2, keep_epoch_checkpoints=1)
    torch.manual_seed(5)
    save_checkpoint({"model": TinyDetector(9).state_dict()}, tmp_path / "livecell.pt")
    result = fit(
        TinyDetector(4),
        build_train_loader(data, cfg),
        None,
        cfg,
        tmp_path / "run",
        init=tmp_path / "livecell.pt",
    )
    assert set(result["init"].reinitialized) == {
        k for k in TinyDetector(4).state_dict() if k.startswith(CLASS_PREFIX)
    }
    assert result["best"]["metric"] == "train_loss"  # no validation: best follows the training loss
    assert (tmp_path / "run" / "best.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "run").glob("epoch_*.pt")) == ["epoch_002.pt"]  # pruned
    weights = torch.load(tmp_path / "run" / "epoch_002.pt", weights_only=True)
    assert weights["epoch"] == 2 and "optimizer" not in weights and weights["metrics"]["epoch"] == 2
