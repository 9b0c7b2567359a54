"""Faster R-CNN with cell-sized anchors (branch 1: Swin-T), built from torchvision's parts.

:class:`CellFasterRCNN` is torchvision's ``GeneralizedRCNN`` assembled from

- the backbone + FPN (:func:`cellmask.models.backbones.build_model_backbone`),
- :class:`cellmask.models.rpn.CellRPN` (chunked anchor matching, float32 boxes),
- :class:`cellmask.models.roi_heads.CellRoIHeads` (torchvision's ``RoIHeads`` API, chunked
  proposal matching, float32 boxes),
- :class:`cellmask.models.transform.CellRCNNTransform`,

exactly as torchvision's ``FasterRCNN`` assembles its own: the module names (``backbone``,
``rpn.head``, ``roi_heads.box_head``, ``roi_heads.box_predictor``) and so the ``state_dict``
keys are torchvision's, and checkpoints of the earlier ``FasterRCNN`` subclass load unchanged.

Every value comes from the config (``model.backbone``, ``fpn``, ``anchor``, ``rpn``, ``roi``,
``transform``; see :mod:`cellmask.models.sections`). The shared builders are re-exported here
(other two-stage detectors, e.g. Soft Teacher's Faster R-CNN, build from them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from cellmask.models.backbones import build_model_backbone
from cellmask.models.roi_heads import FPN_LEVELS, CellRoIHeads, build_box_roi_pool, build_roi_heads
from cellmask.models.rpn import CellRPN, build_anchor_generator, build_rpn, build_rpn_head
from cellmask.models.sections import section
from cellmask.models.transform import CellRCNNTransform, build_transform

__all__ = [
    "FPN_LEVELS",
    "CellFasterRCNN",
    "build_anchor_generator",
    "build_box_roi_pool",
    "build_faster_rcnn",
    "build_model_backbone",
    "build_roi_heads",
    "build_rpn",
    "build_rpn_head",
    "build_transform",
    "section",
]


class CellFasterRCNN(GeneralizedRCNN):
    """Faster R-CNN: ``GeneralizedRCNN(backbone, rpn, roi_heads, transform)`` plus the engine's hooks.

    Train mode: ``model(images, targets) -> {loss_objectness, loss_rpn_box_reg,
    loss_classifier, loss_box_reg}``; eval mode: ``model(images) -> [{"boxes" float32 [N, 4]
    xyxy in original-image pixels, "labels" int64 [N], "scores" float32 [N]}]``.
    """

    rpn: CellRPN
    roi_heads: CellRoIHeads
    transform: CellRCNNTransform

    def class_dependent_prefixes(self) -> list[str]:
        """``state_dict`` key prefixes whose shapes depend on the number of classes."""
        return ["roi_heads.box_predictor."]


def build_faster_rcnn(
    model_cfg: Mapping[str, Any], num_classes: int, backbone: nn.Module | None = None
) -> CellFasterRCNN:
    """Faster R-CNN + FPN from the ``model`` config section.

    Args:
        model_cfg: the complete ``model`` section (``backbone``, ``fpn``, ``anchor``, ``rpn``,
            ``roi``, ``transform``; every key required).
        num_classes: classes including background (4 for the competition, 9 for LIVECell).
        backbone: a prebuilt module with ``out_channels`` giving ``'0'..'3', 'pool'`` maps;
            built from the config when ``None``.

    Returns:
        :class:`CellFasterRCNN`.

    Raises:
        ValueError: ``num_classes < 2``, or a missing/unknown config key (named).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes includes background and must be >= 2, got {num_classes}")
    if backbone is None:
        backbone = build_model_backbone(model_cfg)
    out_channels = int(backbone.out_channels)
    return CellFasterRCNN(
        backbone,
        build_rpn(model_cfg, out_channels),
        build_roi_heads(model_cfg, out_channels, num_classes),
        build_transform(model_cfg),
    )
