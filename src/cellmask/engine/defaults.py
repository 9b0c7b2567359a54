"""The ``train`` config section's defaults and :func:`train_config`, which fills them in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 36,
    "batch_size": 2,
    "optimizer": "adamw",
    "lr": 1.0e-4,
    "weight_decay": 1.0e-2,
    "betas": [0.9, 0.999],
    "momentum": 0.9,
    "no_decay_norm_bias": True,
    "scheduler": "cosine",
    "warmup_iters": 500,
    "warmup_ratio": 0.1,
    "min_lr_ratio": 1.0e-5,
    "milestones": [8, 11],
    "gamma": 0.1,
    "grad_clip": 10.0,
    "amp": True,
    "amp_dtype": "auto",
    "num_workers": 2,
    "prefetch_factor": 2,
    "image_cache": True,
    "seed": 0,
    "type_balance": 0.0,
    "checkpoint_every": 1,
    "keep_epoch_checkpoints": 5,
    "val_every": 1,
    "monitor": "val_AP",
    "monitor_mode": "max",
    "max_nonfinite": 10,
    "max_hours": None,
    "deadline": None,
    "reserve_minutes": 0,
    "progress": None,
    "find_unused_parameters": False,
}
"""What :func:`train_config` fills in for keys a config's ``train`` section lacks.

``max_hours``: wall-clock budget of one :func:`~cellmask.engine.runner.fit` call, in hours
(``null`` or 0: none): training stops after the step that passes it, with ``last.pt`` written
(:class:`~cellmask.engine.loop.WallClockBudget`).
``deadline``: a wall-clock time (``time.time()`` seconds) training must end by, whichever of it
and ``max_hours`` comes first (a Kaggle session sets it from the session's start).
``reserve_minutes``: room kept before the budget's end for the last validation and save; the run
raises it to the slowest validation + save it measures.
``type_balance``: how evenly the cell types share the training steps: each type's share of an
epoch's draws is proportional to ``n_images ** (1 - type_balance)`` (0: uniform over images, as
the paper; 1: every type the same share; :class:`~cellmask.engine.loaders.BalancedSampler`).
``prefetch_factor``: batches each loader worker prepares ahead (used when ``num_workers > 0``).
``image_cache``: the training datasets ``cellmask train`` builds keep decoded images in memory;
the loader's workers persist across epochs, so each worker's cache does too (one 520x704 uint8
image is 0.37 MB: the competition's 606 images are ~222 MB per worker, LIVECell's 4,817
training images (train + test splits) ~1.8 GB per worker)."""


def train_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``train`` section of a full config (or ``cfg`` itself if it is one) over :data:`TRAIN_DEFAULTS`."""
    section = cfg.get("train", cfg) if isinstance(cfg.get("train"), Mapping) else cfg
    return {**TRAIN_DEFAULTS, **dict(section)}
