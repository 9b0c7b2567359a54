"""DDP on two CPU processes (Gloo): identical weights, the non-finite guard decided jointly,
validation on every rank (each its shard, gathered: every rank gets the AP of the whole set),
``on_optimizer_step`` (an EMA copy) equal on every rank, and per-step statistics of both ranks
logged by rank 0. One test: it spawns processes, which costs seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from engine_toys import TinyDetector, ToyDataset, assert_same_weights, spawn_ranks, tiny_cfg
from torch import nn
from torch.utils.data import Subset

from cellmask.engine import (
    build_eval_loader,
    build_train_loader,
    cleanup_distributed,
    fit,
    init_distributed,
    load_checkpoint,
    seed_everything,
    shard,
)
from cellmask.engine.history import read_rows_csv
from cellmask.engine.launch import rank_env
from cellmask.training.validation import evaluate_detector

pytestmark = pytest.mark.usefixtures("one_thread")

VAL_IMAGES = 5  # odd: shards of 3 and 2


class EmaTiny(TinyDetector):
    """A TinyDetector with an EMA copy of its first conv (a parameter without gradient, as a Soft
    Teacher's teacher: DDP does not sync it after the start) and a statistic that differs by rank."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.ema = nn.Parameter(self.det.backbone[0].weight.detach().clone(), requires_grad=False)
        self.iterations: list[int] = []

    def forward(self, images, targets=None):
        out = super().forward(images, targets)
        if self.training:
            out["rank_stat"] = float(dist.get_rank()) if dist.is_initialized() else 0.0
        return out

    def on_optimizer_step(self, iteration: int) -> None:
        self.iterations.append(iteration)
        with torch.no_grad():
            self.ema.mul_(0.5).add_(self.det.backbone[0].weight, alpha=0.5)


def _val_items():
    return ToyDataset(n=VAL_IMAGES, seed=1).items  # un-augmented: the same images on every rank


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(rank_env(rank, world, port))
    torch.set_num_threads(1)
    seed_everything(rank)  # different per rank on purpose: DDP must broadcast rank 0's weights
    model = EmaTiny(4)
    data = ToyDataset(n=8, poison=frozenset({3}))
    cfg = tiny_cfg(epochs=2)
    info = init_distributed("cpu")
    assert info.world_size == world and info.rank == rank
    loader = build_train_loader(data, cfg, None, info)
    assert len(loader) == 2  # 8 images, 2 ranks, batch 2
    val_items = _val_items()
    val_loader = build_eval_loader(
        Subset(val_items, shard(range(len(val_items)), info)), tiny_cfg(batch_size=1)
    )
    initial_ema = model.ema.detach().clone()

    def val_fn(m, epoch, info):
        return evaluate_detector(m, val_loader, info.device, num_classes=4, info=info)

    result = fit(model, loader, val_fn, cfg, Path(out) / "run", device="cpu")
    torch.save(
        {
            "model": model.state_dict(),
            "history": result["history"],
            "iterations": model.iterations,
            "initial_ema": initial_ema,
        },
        Path(out) / f"rank{rank}.pt",
    )
    cleanup_distributed()


def test_ddp_two_processes_agree_on_weights_validation_hooks_and_logs(tmp_path: Path):
    spawn_ranks(_ddp_worker, str(tmp_path))
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert_same_weights(rank0["model"], rank1["model"])
    # each epoch the poisoned image lands in one batch of one rank; both ranks skip that step
    assert [row["train_skipped_steps"] for row in rank0["history"]] == [1.0, 1.0]
    assert [row["train_skipped_steps"] for row in rank1["history"]] == [1.0, 1.0]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert len(ckpt["rng"]) == 2 and ckpt["meta"]["world_size"] == 2
    assert_same_weights(ckpt["model"], rank0["model"])

    # the hook ran on both ranks after each step taken (4 iterations, 2 skipped), so the EMA,
    # which DDP never syncs after the start, moved the same way on both
    steps = read_rows_csv(tmp_path / "run" / "steps.csv")
    skipped = sorted({int(r["iteration"]) for r in steps if r["skipped"] == "1"})
    assert len(skipped) == 2 and rank0["iterations"] == rank1["iterations"]
    assert rank0["iterations"] == [i for i in range(4) if i not in skipped]
    assert not torch.equal(rank0["initial_ema"], rank1["initial_ema"])  # before DDP's broadcast
    assert torch.equal(rank0["model"]["ema"], rank1["model"]["ema"])
    assert not torch.equal(rank0["model"]["ema"], rank0["initial_ema"])

    # per-step values of both ranks reach rank 0's files; the epoch means pool the ranks
    assert len(steps) == 2 * 2 * 2 and {r["rank"] for r in steps} == {"0", "1"}
    assert {r["rank_stat"] for r in steps if r["rank"] == "1"} == {"1.0"}
    assert [row["train_rank_stat"] for row in rank0["history"]] == [0.5, 0.5]
    assert rank0["history"] == [
        {**row, "time_s": r0["time_s"]} for row, r0 in zip(rank1["history"], rank0["history"], strict=True)
    ]

    # every rank validated its shard and got the AP of the whole set, as one process computes it
    model = EmaTiny(4)
    model.load_state_dict(rank0["model"])
    whole = evaluate_detector(model, build_eval_loader(_val_items(), tiny_cfg(batch_size=1)), num_classes=4)
    assert rank0["history"][-1]["val_AP"] == rank1["history"][-1]["val_AP"] == whole["AP"]
    assert rank0["history"][-1]["val_AP50"] == whole["AP50"]
    print(f"val AP {whole['AP']:.4f} AP50 {whole['AP50']:.4f}")
