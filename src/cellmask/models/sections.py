"""The detectors' config sections: which keys each builder reads, checked complete.

The config files are the one source of every number (``configs/base.yaml``'s ``model:``
section states every key below; a branch file or ``--set`` changes some). The builders take
*complete* sections: a missing key is an error naming it (``model.rpn.nms_thresh``), and so is
a key no builder reads (a typo would otherwise be silently ignored). There are no defaults in
the code (only ``backbone.weights_file``, a path, may be absent: :data:`OPTIONAL_KEYS`).

Sections (keys; meanings in ``configs/base.yaml``):

- ``backbone``: ``name`` (a timm name, with its pretrained tag), ``pretrained``,
  ``frozen_stages``, ``kwargs``, ``out_indices``, ``out_norm``, ``weights_file``;
- ``fpn``: ``out_channels``;
- ``anchor``: ``sizes``, ``aspect_ratios``;
- ``rpn``: proposal counts, NMS, matching thresholds, sampler, ``match_chunk``;
- ``roi``: the box head (RoIAlign, MLP, predictor), matching, sampler, post-processing,
  ``match_chunk``;
- ``transform``: ``min_size``, ``max_size``, ``scale``, ``image_mean``, ``image_std``, ``size_divisible``;
- ``cascade``: per-stage ``iou_thresholds``, ``bbox_reg_weights``, ``stage_loss_weights``,
  and ``smooth_l1_beta``;
- ``mask``: the baseline's mask branch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["OPTIONAL_KEYS", "SECTION_KEYS", "require", "section"]

SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "backbone": ("name", "pretrained", "frozen_stages", "kwargs", "out_indices", "out_norm", "weights_file"),
    "fpn": ("out_channels",),
    "anchor": ("sizes", "aspect_ratios"),
    "rpn": (
        "pre_nms_top_n_train",
        "pre_nms_top_n_test",
        "post_nms_top_n_train",
        "post_nms_top_n_test",
        "nms_thresh",
        "fg_iou_thresh",
        "bg_iou_thresh",
        "batch_size_per_image",
        "positive_fraction",
        "score_thresh",
        "match_chunk",
    ),
    "roi": (
        "output_size",
        "sampling_ratio",
        "representation_size",
        "fg_iou_thresh",
        "bg_iou_thresh",
        "batch_size_per_image",
        "positive_fraction",
        "bbox_reg_weights",
        "score_thresh",
        "nms_thresh",
        "detections_per_img",
        "match_chunk",
    ),
    "transform": ("min_size", "max_size", "scale", "image_mean", "image_std", "size_divisible"),
    "cascade": ("iou_thresholds", "bbox_reg_weights", "stage_loss_weights", "smooth_l1_beta"),
    "mask": (
        "enabled",
        "pool_size",
        "sampling_ratio",
        "layers",
        "dilation",
        "dim_reduced",
        "loss_weight",
        "threshold",
    ),
}
"""Every key each section must state (``configs/base.yaml`` states them all)."""

OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {"backbone": ("weights_file",), "transform": ("scale",)}
"""Keys of :data:`SECTION_KEYS` that may be absent, meaning ``null``: ``weights_file`` is a path,
not a number (``cellmask.predict`` drops it when it rebuilds a model from a checkpoint);
``transform.scale`` is newer than runs already trained and published (absent: min/max sizes)."""


def require(
    cfg: Mapping[str, Any] | None, keys: Iterable[str], where: str, optional: Iterable[str] = ()
) -> dict[str, Any]:
    """``cfg`` as a dict, checked to hold exactly ``keys``.

    Args:
        cfg: a config section (``None`` counts as empty).
        keys: the keys it must state.
        where: its dotted name for messages, e.g. ``"model.rpn"``.
        optional: keys of ``keys`` that may be absent (returned as ``None``).

    Raises:
        ValueError: ``cfg`` is not a mapping; a key is missing (the message names the first
            one, ``model.rpn.nms_thresh``, and says where the values live); or a key is unknown.
    """
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(cfg).__name__}")
    keys = tuple(keys)
    cfg = {**dict.fromkeys(optional), **cfg}
    missing = [k for k in keys if k not in cfg]
    if missing:
        more = f" (and {len(missing) - 1} more: {missing[1:]})" if len(missing) > 1 else ""
        raise ValueError(
            f"missing config key {where}.{missing[0]}{more}: every value comes from the config files "
            "(configs/base.yaml states them all); load the config with cellmask.config.load_config"
        )
    unknown = sorted(set(cfg) - set(keys))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(keys)}")
    return dict(cfg)


def section(model_cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``model_cfg[name]`` checked complete against :data:`SECTION_KEYS` (see :func:`require`)."""
    if name not in SECTION_KEYS:
        raise KeyError(f"no such model config section {name!r}; known: {sorted(SECTION_KEYS)}")
    return require(model_cfg.get(name), SECTION_KEYS[name], f"model.{name}", OPTIONAL_KEYS.get(name, ()))
