"""What the steps of :func:`cellmask.engine.runner.fit` share: a :class:`Run`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellmask.engine.checkpoints import (
    InitReport,
)
from cellmask.engine.defaults import train_config
from cellmask.engine.dist import DistInfo
from cellmask.engine.loop import (
    NonFiniteGuard,
    WallClockBudget,
)

STOPPED_MAX_HOURS = "max_hours"
"""``stopped`` of a run (and of its cut epoch's row) that the wall-clock budget ended."""


ValFn = Callable[[nn.Module, int, DistInfo], Mapping[str, float]]
"""``val_fn(model, epoch, info) -> {"AP": ..}``, called on every rank (contract 3)."""


@dataclass
class Run:
    """What the steps of :func:`fit` share: the config, where this process stands, the model with
    its optimisation state, and the run's record so far."""

    cfg: dict[str, Any]
    info: DistInfo
    out_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    iters_per_epoch: int
    monitor: str
    mode: str
    guard: NonFiniteGuard
    step: nn.Module | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    start_epoch: int = 0
    start_iteration: int = 0
    init_report: InitReport | None = None
    budget: WallClockBudget | None = None
    stopped: str | None = None

    @property
    def tcfg(self) -> dict[str, Any]:
        return train_config(self.cfg)

    @property
    def total_epochs(self) -> int:
        return int(self.tcfg["epochs"])
