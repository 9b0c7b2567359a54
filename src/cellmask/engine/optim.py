"""Optimiser and learning-rate schedule (mmdet-style: AdamW or SGD, cosine or step, linear warmup)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cellmask.engine.defaults import train_config

NO_DECAY_KEYS = ("absolute_pos_embed", "relative_position_bias_table", "pos_embed", "norm")
"""Parameter-name fragments never weight-decayed (as in Swin's recipe), besides every 1-d parameter."""


def build_optimizer(cfg: Mapping[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters, from ``cfg["train"]`` (or a train section).

    Keys: ``optimizer`` (``adamw`` | ``sgd``), ``lr``, ``weight_decay``, ``betas`` (AdamW),
    ``momentum`` (SGD), ``no_decay_norm_bias`` (default true: 1-d parameters, i.e. norms and
    biases, and Swin's position tables get no weight decay).
    """
    tcfg = train_config(cfg)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = tcfg["no_decay_norm_bias"] and (param.ndim <= 1 or any(k in name for k in NO_DECAY_KEYS))
        (no_decay if exempt else decay).append(param)
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": float(tcfg["weight_decay"])},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    name, lr = str(tcfg["optimizer"]).lower(), float(tcfg["lr"])
    if name == "adamw":
        betas = tuple(float(b) for b in tcfg["betas"])
        return torch.optim.AdamW(groups, lr=lr, betas=betas)  # type: ignore[arg-type]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(tcfg["momentum"]))
    raise ValueError(f"unknown optimizer {tcfg['optimizer']!r}; expected adamw or sgd")


def lr_factor(
    it: int,
    *,
    kind: str,
    total_iters: int,
    iters_per_epoch: int,
    warmup_iters: int = 0,
    warmup_ratio: float = 0.1,
    min_lr_ratio: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """The learning-rate multiplier at iteration ``it`` (0-based), mmdet-style.

    ``cosine``: ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * it / total_iters)) / 2``,
    reaching ``min_lr_ratio`` at ``total_iters``. ``step``: ``gamma ** k`` with ``k`` the number
    of epoch ``milestones`` passed (``[8, 11]``: x0.1 from the 9th epoch, x0.01 from the 12th).
    ``constant``: 1. Linear warmup multiplies any of them: from ``warmup_ratio`` at iteration 0 to
    1 at ``warmup_iters``.
    """
    if kind == "cosine":
        progress = min(it, total_iters) / max(total_iters, 1)
        base = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "step":
        epoch = it // max(iters_per_epoch, 1)
        base = gamma ** sum(epoch >= m for m in milestones)
    elif kind == "constant":
        base = 1.0
    else:
        raise ValueError(f"unknown scheduler {kind!r}; expected cosine, step or constant")
    if warmup_iters > 0 and it < warmup_iters:
        base *= warmup_ratio + (1.0 - warmup_ratio) * it / warmup_iters
    return base


def build_scheduler(
    cfg: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    iters_per_epoch: int,
    epochs: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration :class:`~torch.optim.lr_scheduler.LambdaLR` following :func:`lr_factor`.

    Keys of ``cfg["train"]``: ``scheduler`` (``cosine`` | ``step`` | ``constant``), ``epochs``
    (overridden by ``epochs``), ``warmup_iters``, ``warmup_ratio``, ``min_lr_ratio`` (cosine),
    ``milestones`` (epochs) and ``gamma`` (step). Call ``step()`` once per iteration.
    """
    tcfg = train_config(cfg)
    epochs = int(epochs if epochs is not None else tcfg["epochs"])
    kwargs = {
        "kind": str(tcfg["scheduler"]).lower(),
        "total_iters": epochs * iters_per_epoch,
        "iters_per_epoch": iters_per_epoch,
        "warmup_iters": int(tcfg["warmup_iters"] or 0),
        "warmup_ratio": float(tcfg["warmup_ratio"]),
        "min_lr_ratio": float(tcfg["min_lr_ratio"]),
        "milestones": [int(m) for m in tcfg["milestones"] or []],
        "gamma": float(tcfg["gamma"]),
    }
    lr_factor(0, **kwargs)  # validates the kind now rather than at the first step

    def factor(it: int) -> float:
        return lr_factor(it, **kwargs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
