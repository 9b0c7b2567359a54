"""Faster R-CNN's box head: torchvision's ``RoIHeads`` with chunked matching and float32 boxes.

:class:`CellRoIHeads` keeps torchvision's ``RoIHeads`` API and attribute names
(``select_training_samples``, ``box_roi_pool``, ``box_head``, ``box_predictor``, ``box_coder``,
``proposal_matcher``, ``fg_bg_sampler``, ``postprocess_detections``, ...), so code written for
torchvision's heads (Soft Teacher's) works unchanged. It differs in:

- ``assign_targets_to_proposals``: :func:`cellmask.models.matching.assign_proposals` with a
  :class:`~cellmask.models.matching.ChunkedMatcher` (same labels as torchvision's, holding only
  ``[G, match_chunk]`` IoUs);
- ``box_coder``: :class:`~cellmask.models.box_coding.Float32BoxCoder` (regression targets and
  decoded boxes in float32 under autocast);
- ``postprocess_detections``: class scores and boxes computed from float32 logits/deltas.

Config (``model.roi``; every key required): ``output_size`` / ``sampling_ratio`` (the 7x7
RoIAlign over P2..P5), ``representation_size`` (the two-layer MLP), ``fg_iou_thresh`` /
``bg_iou_thresh``, ``batch_size_per_image`` / ``positive_fraction`` (the sampler),
``bbox_reg_weights``, ``score_thresh`` / ``nms_thresh`` / ``detections_per_img`` (inference),
``match_chunk`` (proposals per matching chunk; ``null``: torchvision's full table).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

from cellmask.models.box_coding import Float32BoxCoder
from cellmask.models.matching import ChunkedMatcher, assign_proposals
from cellmask.models.rpn import match_chunk_value
from cellmask.models.sections import section

__all__ = ["FPN_LEVELS", "CellRoIHeads", "build_box_roi_pool", "build_roi_heads"]

FPN_LEVELS: list[str] = ["0", "1", "2", "3"]
"""The FPN maps RoIAlign pools from (P2..P5; 'pool' = P6 only feeds the RPN)."""


class CellRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` with chunked proposal matching and float32 box arithmetic.

    Args: as ``RoIHeads``, plus ``match_chunk`` (proposals per matching chunk; ``None`` =
    torchvision's full ``[G, P]`` table).
    """

    def __init__(self, *args: Any, match_chunk: int | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        m = self.proposal_matcher
        self.proposal_matcher = ChunkedMatcher(
            m.high_threshold, m.low_threshold, m.allow_low_quality_matches, chunk=match_chunk
        )
        self.box_coder = Float32BoxCoder(self.box_coder.weights, self.box_coder.bbox_xform_clip)

    def assign_targets_to_proposals(
        self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``(matched_idxs, labels)`` per image, as torchvision's (see ``assign_proposals``)."""
        return assign_proposals(self.proposal_matcher, proposals, gt_boxes, gt_labels)

    def select_training_samples(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """torchvision's sampling on float32 proposals (so truth boxes stay float32 too)."""
        return super().select_training_samples([p.float() for p in proposals], targets)

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """torchvision's post-processing on float32 logits and deltas: float32 boxes and scores."""
        return super().postprocess_detections(
            class_logits.float(), box_regression.float(), [p.float() for p in proposals], image_shapes
        )


def build_box_roi_pool(model_cfg: Mapping[str, Any]) -> MultiScaleRoIAlign:
    """``MultiScaleRoIAlign`` over P2..P5 (``roi.output_size``, ``roi.sampling_ratio``)."""
    r = section(model_cfg, "roi")
    return MultiScaleRoIAlign(FPN_LEVELS, int(r["output_size"]), int(r["sampling_ratio"]))


def build_roi_heads(model_cfg: Mapping[str, Any], in_channels: int, num_classes: int) -> CellRoIHeads:
    """Faster R-CNN's RoI heads of a ``model`` config section for FPN maps of ``in_channels``."""
    r = section(model_cfg, "roi")
    pool = build_box_roi_pool(model_cfg)
    resolution = pool.output_size[0]
    rep = int(r["representation_size"])
    return CellRoIHeads(
        pool,
        TwoMLPHead(in_channels * resolution**2, rep),
        FastRCNNPredictor(rep, num_classes),
        float(r["fg_iou_thresh"]),
        float(r["bg_iou_thresh"]),
        int(r["batch_size_per_image"]),
        float(r["positive_fraction"]),
        tuple(float(w) for w in r["bbox_reg_weights"]),
        float(r["score_thresh"]),
        float(r["nms_thresh"]),
        int(r["detections_per_img"]),
        match_chunk=match_chunk_value(r["match_chunk"]),
    )
