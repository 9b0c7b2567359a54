"""Faster R-CNN on torchvision's ``FasterRCNN`` with cell-sized anchors (branch 1: Swin-T).

Also the shared config -> component helpers the other two-stage detectors (Cascade R-CNN,
Soft Teacher's Faster R-CNN) build from, so every detector reads ``model.anchor``, ``model.rpn``,
``model.roi`` and ``model.transform`` the same way:

- :func:`build_model_backbone` (body + FPN at the transform's nominal input size),
- :func:`build_anchor_generator`, :func:`build_rpn_head`, :func:`build_rpn`,
- :func:`build_transform`,
- :func:`section` (a config section merged over its defaults),
- :data:`FPN_LEVELS` (the maps RoIAlign pools from).

Config keys read (defaults in ``DEFAULT_*``; unknown keys warn):

- ``anchor``: ``sizes`` (one list per FPN level P2..P6, default ``[[8], [16], [32], [64], [128]]``),
  ``aspect_ratios`` (h/w, default ``[0.25, 0.5, 1, 2, 4]``, same for every level; or one list
  per level);
- ``rpn``: ``pre_nms_top_n_{train,test}`` (per level, 2000/1000), ``post_nms_top_n_{train,test}``
  (2000/1000), ``nms_thresh`` 0.7, ``fg_iou_thresh`` 0.7, ``bg_iou_thresh`` 0.3,
  ``batch_size_per_image`` 256, ``positive_fraction`` 0.5, ``score_thresh`` 0.0;
- ``roi``: ``detections_per_img`` 1000, ``score_thresh`` 0.05, ``nms_thresh`` 0.5,
  ``fg_iou_thresh`` 0.5, ``bg_iou_thresh`` 0.5, ``batch_size_per_image`` 512,
  ``positive_fraction`` 0.25, ``representation_size`` 1024, ``bbox_reg_weights``
  ``[10, 10, 5, 5]``, ``output_size`` 7, ``sampling_ratio`` 2;
- ``transform``: ``min_size`` 520 (int or list: multi-scale training), ``max_size`` 704,
  ``image_mean``/``image_std`` (ImageNet), ``size_divisible`` 32.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from cellmask.models.backbones import BackboneWithFPN, build_backbone, nominal_input_size

__all__ = [
    "DEFAULT_ANCHOR",
    "DEFAULT_ROI",
    "DEFAULT_RPN",
    "DEFAULT_TRANSFORM",
    "FPN_LEVELS",
    "CellFasterRCNN",
    "build_anchor_generator",
    "build_box_roi_pool",
    "build_faster_rcnn",
    "build_model_backbone",
    "build_rpn",
    "build_rpn_head",
    "build_transform",
    "section",
]

FPN_LEVELS: list[str] = ["0", "1", "2", "3"]
"""The FPN maps RoIAlign pools from (P2..P5; 'pool' = P6 only feeds the RPN)."""

DEFAULT_ANCHOR: dict[str, Any] = {
    "sizes": [[8], [16], [32], [64], [128]],
    "aspect_ratios": [0.25, 0.5, 1.0, 2.0, 4.0],
}
DEFAULT_RPN: dict[str, Any] = {
    "pre_nms_top_n_train": 2000,
    "pre_nms_top_n_test": 1000,
    "post_nms_top_n_train": 2000,
    "post_nms_top_n_test": 1000,
    "nms_thresh": 0.7,
    "fg_iou_thresh": 0.7,
    "bg_iou_thresh": 0.3,
    "batch_size_per_image": 256,
    "positive_fraction": 0.5,
    "score_thresh": 0.0,
}
DEFAULT_ROI: dict[str, Any] = {
    "detections_per_img": 1000,
    "score_thresh": 0.05,
    "nms_thresh": 0.5,
    "fg_iou_thresh": 0.5,
    "bg_iou_thresh": 0.5,
    "batch_size_per_image": 512,
    "positive_fraction": 0.25,
    "representation_size": 1024,
    "bbox_reg_weights": [10.0, 10.0, 5.0, 5.0],
    "output_size": 7,
    "sampling_ratio": 2,
}
DEFAULT_TRANSFORM: dict[str, Any] = {
    "min_size": 520,
    "max_size": 704,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "size_divisible": 32,
}
_DEFAULTS = {"anchor": DEFAULT_ANCHOR, "rpn": DEFAULT_RPN, "roi": DEFAULT_ROI, "transform": DEFAULT_TRANSFORM}


def section(
    model_cfg: Mapping[str, Any], name: str, defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``model_cfg[name]`` merged over its defaults (absent or ``None``: the defaults).

    ``defaults`` defaults to the shared ones of ``anchor``, ``rpn``, ``roi`` and ``transform``;
    a detector passes its own for its other sections (e.g. Cascade R-CNN's ``cascade``). Keys the
    defaults do not know are kept but warned about (a typo would otherwise be ignored).
    """
    if defaults is None:
        defaults = _DEFAULTS[name]
    given = model_cfg.get(name) or {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        warnings.warn(
            f"model.{name}: unknown key(s) {unknown} ignored by the shared builders (known: {sorted(defaults)})",
            stacklevel=2,
        )
    return {**defaults, **given}


def _min_size(value: Any) -> int | tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return int(value)


def build_model_backbone(model_cfg: Mapping[str, Any]) -> BackboneWithFPN:
    """Body + FPN of ``model_cfg``, sized for the nominal input of its transform (see backbones)."""
    if "backbone" not in model_cfg:
        raise ValueError("model config needs a 'backbone' section ({name, pretrained, kwargs})")
    t = section(model_cfg, "transform")
    image_size = nominal_input_size(_min_size(t["min_size"]), int(t["max_size"]), int(t["size_divisible"]))
    return build_backbone(model_cfg["backbone"], model_cfg.get("fpn"), image_size)


def build_anchor_generator(model_cfg: Mapping[str, Any], num_levels: int = 5) -> AnchorGenerator:
    """One ``AnchorGenerator`` for the FPN levels: ``sizes[i]`` px at level i, every ratio at each
    (or ``aspect_ratios[i]`` at level i, given one list per level)."""
    a = section(model_cfg, "anchor")
    sizes = tuple(
        tuple(float(s) for s in (level if isinstance(level, (list, tuple)) else [level]))
        for level in a["sizes"]
    )
    if len(sizes) != num_levels:
        raise ValueError(f"model.anchor.sizes has {len(sizes)} levels, the FPN gives {num_levels} (P2..P6)")
    if len({len(s) for s in sizes}) != 1:
        raise ValueError(
            "model.anchor.sizes: every level needs the same number of sizes (one RPN head for all)"
        )
    ratios = a["aspect_ratios"]
    if ratios and isinstance(ratios[0], (list, tuple)):
        aspect_ratios = tuple(tuple(float(r) for r in level) for level in ratios)
    else:
        aspect_ratios = (tuple(float(r) for r in ratios),) * len(sizes)
    return AnchorGenerator(sizes=sizes, aspect_ratios=aspect_ratios)


def build_rpn_head(in_channels: int, anchor_generator: AnchorGenerator) -> RPNHead:
    """torchvision's RPN head (one 3x3 conv, then objectness + box deltas per anchor)."""
    return RPNHead(in_channels, anchor_generator.num_anchors_per_location()[0])


def _rpn_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    r = section(model_cfg, "rpn")
    return {
        "pre_nms_top_n": {"training": int(r["pre_nms_top_n_train"]), "testing": int(r["pre_nms_top_n_test"])},
        "post_nms_top_n": {
            "training": int(r["post_nms_top_n_train"]),
            "testing": int(r["post_nms_top_n_test"]),
        },
        "nms_thresh": float(r["nms_thresh"]),
        "fg_iou_thresh": float(r["fg_iou_thresh"]),
        "bg_iou_thresh": float(r["bg_iou_thresh"]),
        "batch_size_per_image": int(r["batch_size_per_image"]),
        "positive_fraction": float(r["positive_fraction"]),
        "score_thresh": float(r["score_thresh"]),
    }


def build_rpn(model_cfg: Mapping[str, Any], in_channels: int) -> RegionProposalNetwork:
    """The RPN of ``model_cfg`` (anchors + head + proposal settings) for FPN maps of ``in_channels``."""
    anchors = build_anchor_generator(model_cfg)
    return RegionProposalNetwork(anchors, build_rpn_head(in_channels, anchors), **_rpn_kwargs(model_cfg))


def build_transform(model_cfg: Mapping[str, Any]) -> GeneralizedRCNNTransform:
    """Normalise (config mean/std), resize (min/max size) and batch-pad (to ``size_divisible``)."""
    t = section(model_cfg, "transform")
    return GeneralizedRCNNTransform(
        _min_size(t["min_size"]),
        int(t["max_size"]),
        [float(v) for v in t["image_mean"]],
        [float(v) for v in t["image_std"]],
        size_divisible=int(t["size_divisible"]),
    )


def build_box_roi_pool(model_cfg: Mapping[str, Any]) -> MultiScaleRoIAlign:
    """``MultiScaleRoIAlign`` over P2..P5 (7x7, sampling ratio 2 by default)."""
    r = section(model_cfg, "roi")
    return MultiScaleRoIAlign(FPN_LEVELS, int(r["output_size"]), int(r["sampling_ratio"]))


class CellFasterRCNN(FasterRCNN):
    """torchvision's ``FasterRCNN`` plus the hooks the engine uses."""

    def class_dependent_prefixes(self) -> list[str]:
        """``state_dict`` key prefixes whose shapes depend on the number of classes."""
        return ["roi_heads.box_predictor."]


def build_faster_rcnn(
    model_cfg: dict[str, Any], num_classes: int, backbone: nn.Module | None = None
) -> CellFasterRCNN:
    """Faster R-CNN + FPN from the ``model`` config section.

    Args:
        model_cfg: the ``model`` section (``backbone``, ``fpn``, ``anchor``, ``rpn``, ``roi``,
            ``transform``; see the module docstring for keys and defaults).
        num_classes: classes including background (4 for the competition, 9 for LIVECell).
        backbone: a prebuilt module with ``out_channels`` giving ``'0'..'3', 'pool'`` maps;
            built from the config when ``None``.

    Returns:
        :class:`CellFasterRCNN`: losses dict in train mode, ``[{"boxes", "labels", "scores"}]``
        in original image coordinates in eval mode.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes includes background and must be >= 2, got {num_classes}")
    if backbone is None:
        backbone = build_model_backbone(model_cfg)
    out_channels = int(backbone.out_channels)
    t = section(model_cfg, "transform")
    r = section(model_cfg, "roi")
    anchors = build_anchor_generator(model_cfg)
    pool = build_box_roi_pool(model_cfg)
    resolution = pool.output_size[0]
    rep = int(r["representation_size"])
    rpn = _rpn_kwargs(model_cfg)
    return CellFasterRCNN(
        backbone,
        num_classes=None,
        min_size=_min_size(t["min_size"]),
        max_size=int(t["max_size"]),
        image_mean=[float(v) for v in t["image_mean"]],
        image_std=[float(v) for v in t["image_std"]],
        size_divisible=int(t["size_divisible"]),
        rpn_anchor_generator=anchors,
        rpn_head=build_rpn_head(out_channels, anchors),
        rpn_pre_nms_top_n_train=rpn["pre_nms_top_n"]["training"],
        rpn_pre_nms_top_n_test=rpn["pre_nms_top_n"]["testing"],
        rpn_post_nms_top_n_train=rpn["post_nms_top_n"]["training"],
        rpn_post_nms_top_n_test=rpn["post_nms_top_n"]["testing"],
        rpn_nms_thresh=rpn["nms_thresh"],
        rpn_fg_iou_thresh=rpn["fg_iou_thresh"],
        rpn_bg_iou_thresh=rpn["bg_iou_thresh"],
        rpn_batch_size_per_image=rpn["batch_size_per_image"],
        rpn_positive_fraction=rpn["positive_fraction"],
        rpn_score_thresh=rpn["score_thresh"],
        box_roi_pool=pool,
        box_head=TwoMLPHead(out_channels * resolution**2, rep),
        box_predictor=FastRCNNPredictor(rep, num_classes),
        box_score_thresh=float(r["score_thresh"]),
        box_nms_thresh=float(r["nms_thresh"]),
        box_detections_per_img=int(r["detections_per_img"]),
        box_fg_iou_thresh=float(r["fg_iou_thresh"]),
        box_bg_iou_thresh=float(r["bg_iou_thresh"]),
        box_batch_size_per_image=int(r["batch_size_per_image"]),
        box_positive_fraction=float(r["positive_fraction"]),
        bbox_reg_weights=tuple(float(w) for w in r["bbox_reg_weights"]),
    )
