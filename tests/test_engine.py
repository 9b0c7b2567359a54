"""The training engine: schedules, checkpoints, bit-exact resume, --init, DDP, the non-finite guard,
COCO box AP, and the run directory (metrics.csv / metrics.png).

A tiny torchvision Faster R-CNN (2-conv backbone, 64x64 images) stands in for the real detectors,
so these tests depend only on the engine's contracts.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from cellmask.coco_eval import coco_box_ap, evaluate_detector
from cellmask.engine import (
    CheckpointError,
    NonFiniteGuard,
    build_eval_loader,
    build_optimizer,
    build_scheduler,
    build_train_loader,
    cleanup_distributed,
    fit,
    init_distributed,
    load_checkpoint,
    load_init_weights,
    lr_factor,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    train_one_epoch,
)

SIZE = 64
CLASS_PREFIX = "det.roi_heads.box_predictor."


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyDetector(nn.Module):
    """A torchvision Faster R-CNN small enough for CPU tests; ``poison`` targets give a NaN loss."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        backbone.out_channels = 16
        self.det = FasterRCNN(
            backbone,
            num_classes=None,
            rpn_anchor_generator=AnchorGenerator(sizes=((8, 16),), aspect_ratios=((0.5, 1.0, 2.0),)),
            box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
            box_head=TwoMLPHead(16 * 7 * 7, 32),
            box_predictor=FastRCNNPredictor(32, num_classes),
            min_size=SIZE,
            max_size=SIZE,
            rpn_pre_nms_top_n_train=60,
            rpn_post_nms_top_n_train=30,
            rpn_pre_nms_top_n_test=60,
            rpn_post_nms_top_n_test=30,
            rpn_batch_size_per_image=32,
            box_batch_size_per_image=32,
            box_detections_per_img=30,
            box_score_thresh=0.0,
        )

    def forward(self, images, targets=None):
        out = self.det(images, targets)
        if self.training and targets and any(bool(t.get("poison", False)) for t in targets):
            out = {**out, "loss_poison": torch.tensor(float("nan"))}
        return out

    def class_dependent_prefixes(self) -> list[str]:
        return [CLASS_PREFIX]


class ToyDataset(Dataset):
    """Bright rectangles on noise; random flip (torch RNG) and brightness (numpy RNG) per item."""

    def __init__(self, n: int = 6, seed: int = 0, poison: frozenset[int] = frozenset()) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            image = torch.rand(3, SIZE, SIZE, generator=g) * 0.2
            boxes = []
            for _ in range(3):
                x0, y0 = torch.randint(0, SIZE - 20, (2,), generator=g).tolist()
                w, h = torch.randint(8, 18, (2,), generator=g).tolist()
                image[:, y0 : y0 + h, x0 : x0 + w] += 0.7
                boxes.append([x0, y0, x0 + w, y0 + h])
            target = {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.randint(1, 4, (3,), generator=g),
                "image_id": i,
            }
            if i in poison:
                target["poison"] = True
            self.items.append((image.clamp(0, 1), target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        image, target = self.items[i]
        image, target = (
            image.clone(),
            {k: (v.clone() if torch.is_tensor(v) else v) for k, v in target.items()},
        )
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes = target["boxes"]
            target["boxes"] = torch.stack(
                [SIZE - boxes[:, 2], boxes[:, 1], SIZE - boxes[:, 0], boxes[:, 3]], 1
            )
        image = (image * float(np.random.uniform(0.9, 1.1))).clamp(0, 1)  # noqa: NPY002 (global RNG on purpose)
        return image, target


def tiny_cfg(**train) -> dict:
    return {
        "train": {
            "epochs": 2,
            "batch_size": 2,
            "optimizer": "adamw",
            "lr": 1e-3,
            "weight_decay": 1e-2,
            "scheduler": "cosine",
            "warmup_iters": 2,
            "grad_clip": 10.0,
            "amp": False,
            "num_workers": 0,
            "seed": 0,
            "progress": False,
            **train,
        },
        "model": {"type": "tiny"},
    }


def make_val_fn(dataset: Dataset, cfg: dict, interrupt_at: int | None = None):
    loader = build_eval_loader(dataset, cfg)

    def val_fn(model, epoch):
        if epoch == interrupt_at:
            raise KeyboardInterrupt("simulated crash")
        return evaluate_detector(model, loader, "cpu", num_classes=4)

    return val_fn


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


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


# ------------------------------------------------------------------------------ guard / protocol


class StepModel(nn.Module):
    """Defines ``training_step``: the engine must call it instead of ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.calls = 0

    def forward(self, *args, **kwargs):
        raise AssertionError("the engine must use training_step")

    def training_step(self, batch):
        self.calls += 1
        images, targets = batch
        loss = self.lin(torch.stack(images)).pow(2).mean()
        if any(t.get("poison") for t in targets):
            loss = loss * float("nan")
        return {"loss_l2": loss}


def _batches(poison: list[bool]):
    g = torch.Generator().manual_seed(0)
    return [([torch.randn(2, generator=g)], [{"poison": p}]) for p in poison]


def test_non_finite_loss_skips_the_step():
    model = StepModel()
    opt = build_optimizer(tiny_cfg(), model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_one_epoch(model, _batches([True]), opt, cfg=tiny_cfg())
    assert model.calls == 1 and stats["skipped_steps"] == 1 and math.isnan(stats["loss"])
    assert_same_weights(model.state_dict(), before)  # the NaN step changed nothing

    stats = train_one_epoch(model, _batches([False, True, False]), opt, cfg=tiny_cfg())
    assert stats["skipped_steps"] == 1 and stats["iters"] == 3 and math.isfinite(stats["loss"])
    assert not torch.equal(model.lin.weight, before["lin.weight"])
    assert all(torch.isfinite(p).all() for p in model.parameters())

    guard = NonFiniteGuard(max_consecutive=3)
    with pytest.raises(FloatingPointError, match="3 consecutive"):
        train_one_epoch(
            model, _batches([True, True, False, True, True, True]), opt, cfg=tiny_cfg(), guard=guard
        )
    assert guard.skipped == 5


# ------------------------------------------------------------------------------------- fit / resume


def test_fit_resume_is_bit_exact_and_writes_the_run_dir(tmp_path: Path):
    data = ToyDataset(n=6)
    cfg = tiny_cfg()

    seed_everything(0)
    straight = TinyDetector(4)
    full = fit(
        straight, build_train_loader(data, cfg), make_val_fn(data, cfg), cfg, tmp_path / "a", device="cpu"
    )

    seed_everything(0)
    first = TinyDetector(4)
    with pytest.raises(KeyboardInterrupt):  # dies during epoch 2's validation: last.pt is epoch 1
        fit(
            first,
            build_train_loader(data, cfg),
            make_val_fn(data, cfg, interrupt_at=1),
            cfg,
            tmp_path / "b",
            device="cpu",
        )
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
    seed_everything(rank)  # different per rank on purpose: DDP must broadcast rank 0's weights
    model = TinyDetector(4)
    data = ToyDataset(n=8, poison=frozenset({3}))
    cfg = tiny_cfg(epochs=2)
    info = init_distributed("cpu")
    assert info.world_size == world and info.rank == rank
    loader = build_train_loader(data, cfg, None, info)
    assert len(loader) == 2  # 8 images, 2 ranks, batch 2
    result = fit(model, loader, None, cfg, Path(out) / "run", device="cpu")
    torch.save({"model": model.state_dict(), "history": result["history"]}, Path(out) / f"rank{rank}.pt")
    cleanup_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_end_with_identical_weights(tmp_path: Path):
    import torch.multiprocessing as mp

    context = mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish in 120 s")
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert_same_weights(rank0["model"], rank1["model"])
    # each epoch the poisoned image lands in one batch of one rank; both ranks skip that step
    assert [row["train_skipped_steps"] for row in rank0["history"]] == [1.0, 1.0]
    assert [row["train_skipped_steps"] for row in rank1["history"]] == [1.0, 1.0]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert len(ckpt["rng"]) == 2 and ckpt["meta"]["world_size"] == 2
    assert_same_weights(ckpt["model"], rank0["model"])


# ---------------------------------------------------------------------------------------- COCO AP


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}


def _pred(boxes, labels, scores=None):
    scores = scores if scores is not None else [0.9] * len(boxes)
    return {**_target(boxes, labels), "scores": torch.tensor(scores, dtype=torch.float32)}


TRUTH = [
    _target([[10, 10, 30, 30], [40, 40, 60, 70], [5, 50, 25, 60]], [1, 2, 1]),
    _target([[0, 0, 20, 20], [30, 5, 50, 25]], [3, 1]),
]


def test_coco_ap_hand_cases():
    perfect = [_pred(t["boxes"].tolist(), t["labels"].tolist()) for t in TRUTH]
    result = coco_box_ap(perfect, TRUTH, num_classes=4)
    assert result == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0), "AP75": pytest.approx(1.0)}

    empty = [_pred([], []) for _ in TRUTH]
    assert coco_box_ap(empty, TRUTH, num_classes=4) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}

    missing = [_pred(TRUTH[0]["boxes"][:2].tolist(), [1, 2]), perfect[1]]  # one class-1 box dropped
    result = coco_box_ap(missing, TRUTH, num_classes=4)
    assert 0.0 < result["AP50"] < 1.0 and result["AP"] < 1.0

    wrong_class = [_pred(t["boxes"].tolist(), [1] * len(t["boxes"])) for t in TRUTH]
    assert coco_box_ap(wrong_class, TRUTH, num_classes=4)["AP50"] < 1.0

    shifted = [
        _pred((t["boxes"] + torch.tensor([3.0, 0, 3, 0])).tolist(), t["labels"].tolist()) for t in TRUTH
    ]  # IoU 0.74
    result = coco_box_ap(shifted, TRUTH, num_classes=4)
    assert result["AP75"] == 0.0 and result["AP50"] > 0.0

    assert math.isnan(coco_box_ap(empty, [_target([], []) for _ in TRUTH])["AP"])  # no truth at all


def test_coco_ap_counts_more_than_100_detections_per_image():
    xs = np.arange(0, 15 * 15, 15)
    boxes = [[x, y, x + 10, y + 10] for x in xs for y in xs[:10]]  # 150 cells in one image
    truth = [_target(boxes, [1] * len(boxes))]
    assert coco_box_ap([_pred(boxes, [1] * len(boxes))], truth, num_classes=2)["AP50"] == pytest.approx(1.0)
    capped = coco_box_ap([_pred(boxes, [1] * len(boxes))], truth, num_classes=2, max_dets=(1, 10, 100))
    assert capped["AP50"] < 0.7  # COCO's default 100 would cap recall at 100/150


# ------------------------------------------------------------------------- cellmask train (smoke)


@pytest.mark.slow
def test_train_command_livecell_then_init_on_competition(tmp_path: Path):
    """`cellmask train` end to end on synthetic data: LIVECell (9 classes) -> --init competition (4)."""
    import argparse

    import yaml

    from cellmask.data import synthetic
    from cellmask.train import add_train_arguments, cli_train

    root = tmp_path / "data"
    synthetic.write_dataset(root, n_train=6, n_unlabeled=0, n_test=0, n_livecell=6, seed=0, size=(130, 176))
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config = Path(__file__).resolve().parents[1] / "configs" / "faster_rcnn_swin_t.yaml"
    common = ["--config", str(config), "--data", str(root), "--profile", "smoke", "--device", "cpu"]
    common += ["--set", "train.progress=false"]

    args = parser.parse_args(
        [*common, "--dataset", "livecell", "--out", str(tmp_path / "lc"), "--epochs", "1"]
    )
    assert cli_train(args) == 0
    saved = yaml.safe_load((tmp_path / "lc" / "config.yaml").read_text())
    assert saved["profile"] == "smoke" and saved["data"]["num_classes"] == 9 and saved["train"]["epochs"] == 1

    out = tmp_path / "ft"
    args = parser.parse_args([*common, "--dataset", "sartorius", "--out", str(out), "--epochs", "1"])
    args.init = str(tmp_path / "lc" / "best.pt")
    assert cli_train(args) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["config"]["data"]["classes"] == ["shsy5y", "cort", "astro"]
    cls = [v for k, v in ckpt["model"].items() if k.endswith("cls_score.weight")]
    assert cls and cls[0].shape[0] == 4
    with (out / "metrics.csv").open() as f:
        assert "val_AP" in next(csv.DictReader(f))

    args = parser.parse_args([*common, "--dataset", "sartorius", "--out", str(tmp_path / "none"), "--resume"])
    with pytest.raises(FileNotFoundError, match="last.pt"):
        cli_train(args)
