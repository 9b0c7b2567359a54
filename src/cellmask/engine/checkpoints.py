"""Checkpoints: atomic save, ``weights_only`` load with clear errors, the weights inside one, and
``--init`` (initialising a model from a checkpoint trained with another class set)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellmask.errors import DataError

log = logging.getLogger("cellmask.engine")


class CheckpointError(DataError):
    """A checkpoint file exists but cannot be read, or lacks what the caller needs."""


def save_checkpoint(payload: Mapping[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, map_location, weights_only=True)`` with clear errors.

    Raises:
        FileNotFoundError: no such file (the message names it).
        CheckpointError: the file is not a readable checkpoint (corrupt, truncated, or holding
            objects other than tensors and plain containers).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {reason[:300]})"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def checkpoint_state_dict(
    ckpt: Mapping[str, Any], path: str | Path = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint: ``ckpt["model"]``, ``ckpt["state_dict"]``, or ``ckpt``
    itself if it maps names to tensors; a DDP ``module.`` prefix is stripped."""
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), Mapping):
            state = dict(ckpt[key])
            break
    else:
        state = dict(ckpt)
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no model state_dict (keys: {', '.join(list(ckpt)[:8])})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


@dataclass
class InitReport:
    """What :func:`load_init_weights` did, key by key."""

    loaded: list[str]
    reinitialized: list[str]
    missing: list[str]
    unexpected: list[str]

    def summary(self) -> str:
        text = f"{len(self.loaded)} tensors loaded, {len(self.reinitialized)} re-initialised"
        if self.reinitialized:
            text += f" ({', '.join(self.reinitialized)})"
        if self.missing:
            text += f", {len(self.missing)} not in the checkpoint ({', '.join(self.missing[:10])})"
        if self.unexpected:
            text += f", {len(self.unexpected)} unused ({', '.join(self.unexpected[:10])})"
        return text


def load_init_weights(model: nn.Module, source: str | Path | Mapping[str, Any]) -> InitReport:
    """Initialise ``model`` from a checkpoint trained with a possibly different class set.

    If ``model`` defines ``map_init_state_dict(state) -> state``, the checkpoint's state_dict
    goes through it first (e.g. Soft Teacher: one Faster R-CNN checkpoint initialises both its
    student and its teacher). Every tensor whose name and shape then match is copied. The rest
    keep ``model``'s own (fresh) initialisation: tensors whose shape differs, and, when any tensor under one of
    ``model.class_dependent_prefixes()`` differs, every tensor under those prefixes (so a class
    layer is re-initialised as a whole, weight and bias alike).

    Args:
        model: a freshly built model (its class layers' current values are the re-initialisation).
        source: a checkpoint path (``{"model": state_dict, ...}``, ``{"state_dict": ...}`` or a
            bare state_dict) or such a mapping already loaded.

    Returns:
        the :class:`InitReport` (also logged).
    """
    where = str(source) if isinstance(source, str | Path) else "checkpoint"
    ckpt = load_checkpoint(source) if isinstance(source, str | Path) else dict(source)
    src = checkpoint_state_dict(ckpt, where)
    if callable(getattr(model, "map_init_state_dict", None)):
        src = dict(model.map_init_state_dict(src))
    dst = model.state_dict()
    prefixes = list(model.class_dependent_prefixes()) if hasattr(model, "class_dependent_prefixes") else []
    mismatched = {k for k in dst if k in src and tuple(src[k].shape) != tuple(dst[k].shape)}
    reinit = set(mismatched)
    if any(k.startswith(p) for k in mismatched for p in prefixes):
        reinit |= {k for k in dst if any(k.startswith(p) for p in prefixes)}
    load = {k: src[k] for k in dst if k in src and k not in reinit}
    model.load_state_dict(load, strict=False)
    report = InitReport(
        loaded=sorted(load),
        reinitialized=sorted(reinit),
        missing=sorted(k for k in dst if k not in src),
        unexpected=sorted(k for k in src if k not in dst),
    )
    log.info("init from %s: %s", where, report.summary())
    return report


def prune_epoch_checkpoints(out_dir: Path, keep: int | None) -> None:
    """Delete all but the ``keep`` newest ``epoch_XXX.pt`` (``None``/0: keep every one)."""
    if not keep:
        return
    for old in sorted(Path(out_dir).glob("epoch_*.pt"))[: -int(keep)]:
        old.unlink()
