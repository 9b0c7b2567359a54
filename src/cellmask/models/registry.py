"""Detectors: ``build_detector(model_cfg, num_classes)`` (the segmenter: ``cellmask.models.segmenter``).

Importing this package is cheap: builders (and torch / torchvision / timm) are imported when a
detector is built. Types (``model_cfg["type"]``):

- ``faster_rcnn``: :func:`cellmask.models.faster_rcnn.build_faster_rcnn`;
- ``cascade_rcnn``, ``cascade_mask_rcnn``: ``cellmask.models.cascade_rcnn.build_cascade_rcnn``
  (``model_cfg["mask"]["enabled"]`` is set from the type: true only for ``cascade_mask_rcnn``).

Every model follows torchvision's ``GeneralizedRCNN`` convention and has
``class_dependent_prefixes()``. Other builders register with :func:`register_detector`.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from typing import Any

_MASK_TYPES = {"cascade_mask_rcnn"}

# type -> "module:function" (imported on use) or a callable(model_cfg, num_classes).
_REGISTRY: dict[str, str | Callable[..., Any]] = {
    "faster_rcnn": "cellmask.models.faster_rcnn:build_faster_rcnn",
    "cascade_rcnn": "cellmask.models.cascade_rcnn:build_cascade_rcnn",
    "cascade_mask_rcnn": "cellmask.models.cascade_rcnn:build_cascade_rcnn",
    "soft_teacher": "cellmask.models.soft_teacher:build_soft_teacher",
}

DETECTOR_TYPES: tuple[str, ...] = tuple(_REGISTRY)
"""The detector types known at import time (``register_detector`` may add more)."""


def register_detector(type_name: str, builder: str | Callable[..., Any]) -> None:
    """Register ``builder(model_cfg, num_classes, backbone)`` (or ``"module:function"``) for a type."""
    _REGISTRY[type_name] = builder


def _resolve(builder: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(builder):
        return builder
    module, _, func = builder.partition(":")
    return getattr(importlib.import_module(module), func)


def _mask_cfg(model_cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    """``model_cfg`` with ``mask.enabled`` matching the type; a contradicting config is an error."""
    wants_mask = kind in _MASK_TYPES
    given = (model_cfg.get("mask") or {}).get("enabled")
    if given is not None and bool(given) != wants_mask:
        hint = "use type cascade_mask_rcnn" if given else f"type {kind} always has a mask head"
        raise ValueError(f"model.type {kind!r} contradicts model.mask.enabled={given}: {hint}")
    cfg = copy.deepcopy(model_cfg)
    cfg["mask"] = {**(cfg.get("mask") or {}), "enabled": wants_mask}
    return cfg


def build_detector(model_cfg: dict[str, Any], num_classes: int) -> Any:
    """Build the detector ``model_cfg["type"]`` describes.

    Args:
        model_cfg: the ``model`` config section.
        num_classes: classes including background (4 for the competition, 9 for LIVECell).

    Returns:
        a ``torch.nn.Module`` in torchvision's ``GeneralizedRCNN`` convention.

    Raises:
        ValueError: unknown or missing type (the message lists the known ones), or a
            ``mask.enabled`` that contradicts the type.
    """
    kind = model_cfg.get("type")
    if kind not in _REGISTRY:
        raise ValueError(f"unknown model.type {kind!r}; known: {', '.join(sorted(_REGISTRY))}")
    cfg = _mask_cfg(model_cfg, kind)
    builder = _resolve(_REGISTRY[kind])  # import first: a missing module fails before any building
    from cellmask.models.backbones import build_model_backbone

    return builder(cfg, num_classes, build_model_backbone(cfg))
