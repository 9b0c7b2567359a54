"""Cascade R-CNN and Cascade Mask R-CNN on torchvision's detection parts (no mmdet).

Cascade R-CNN (Cai & Vasconcelos, CVPR 2018) replaces Faster R-CNN's single box head by a
sequence of heads trained at increasing IoU thresholds (0.5 / 0.6 / 0.7): each stage
regresses the boxes of the previous one, so later stages see better-localised RoIs and can be
trained at a stricter threshold without running out of positives. Branches 2 and 3 of
MDE-CellMask are Cascade R-CNNs (ResNeXt-101 / ResNeSt-101); the paper's baseline is a
Cascade Mask R-CNN (ResNeXt-101), i.e. the same detector with a mask head.

The model is torchvision's :class:`GeneralizedRCNN` with the shared backbone, RPN
(:mod:`cellmask.models.rpn`) and transform (:mod:`cellmask.models.transform`), and
:class:`cellmask.models.cascade_heads.CascadeRoIHeads` (mask branch:
:mod:`cellmask.models.mask_head`). Every value comes from the config (sections ``backbone``,
``fpn``, ``anchor``, ``rpn``, ``roi``, ``transform``, ``cascade``, ``mask``).

Design choices (following mmdetection's ``CascadeRoIHead``, which the paper used):

* **Per stage**: its own ``TwoMLPHead`` + :class:`CascadeBoxPredictor` (``num_classes``
  logits, *class-agnostic* 4-d box regression), its own matcher at ``t`` (positive iff
  IoU >= t, negative otherwise, no low-quality matches; chunked, ``roi.match_chunk``) and its
  own float32 box coder whose weights tighten stage by stage ((10,10,5,5), (20,20,10,10),
  (30,30,15,15), i.e. target stds 0.1/0.2 -> 0.05/0.1 -> 0.033/0.067). One RoIAlign (7x7) and
  one sampler are shared.
* **Training**: stage 1 gets the RPN proposals with the truth boxes appended; it is matched at
  its threshold and sampled (``batch_size_per_image`` RoIs, ``positive_fraction``
  positives). Stage k+1 gets stage k's *sampled* RoIs regressed by stage k's head, clipped to
  the image and **detached** (no gradient flows from a stage's loss into earlier heads
  through the boxes), minus the RoIs that were appended truth boxes, plus the truth boxes
  appended afresh; then it is re-matched at its own threshold and re-sampled. Losses per stage
  (``loss_classifier_s{k}``, ``loss_box_reg_s{k}``, k = 1..3): cross entropy over the sampled
  RoIs + SmoothL1 with ``cascade.smooth_l1_beta`` = 1.0 (mmdet's cascade bbox heads use
  ``SmoothL1Loss(beta=1.0)``; torchvision's Faster R-CNN uses 1/9), summed over positives and
  divided by the number of sampled RoIs (mmdet's ``avg_factor``), both multiplied by the stage
  loss weight (1 / 0.5 / 0.25).
* **Inference** (mmdet 2.x ``CascadeRoIHead.simple_test``, which the paper used): stage 1
  scores and regresses the proposals, stage k+1 the RoIs stage k regressed (clipped to the
  image), so each classifier sees RoIs like those it was trained on; the class probabilities
  are the softmax of the three stages' *mean logits*; the boxes are stage 3's regression of its
  RoIs. (The earlier rule here, every classifier on the last stage's RoIs with their softmaxes
  averaged, did no better on a tiny trained cascade: held-out box AP 0.569 against 0.572, mean
  of 3 seeds.) Then, like torchvision: every
  (RoI, foreground class) pair is a candidate, score > ``score_thresh``, boxes smaller than
  0.01 px removed, per-class NMS (``nms_thresh``), top ``detections_per_img`` kept.
* **Mask head** (optional, the baseline): on the last stage only. RoIAlign 14x14 ->
  ``MaskRCNNHeads`` (4 x 256 convs) -> ``MaskRCNNPredictor`` (``num_classes`` 28x28 logits);
  trained on stage 3's positive sampled RoIs (targets: windows of the matched truth masks
  resampled onto the RoIs with aligned RoIAlign (soft), binary cross entropy on the
  truth class' channel, ``loss_mask`` times ``mask.loss_weight``); at inference computed for
  the final detections and pasted into the original image with ``paste_masks`` by the
  transform: ``masks`` is a :class:`cellmask.models.segmenter.PastedMasks` (contract 7).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from cellmask.models.backbones import build_model_backbone
from cellmask.models.cascade_heads import CascadeBoxPredictor, CascadeRoIHeads
from cellmask.models.mask_head import build_mask_branch
from cellmask.models.roi_heads import build_box_roi_pool
from cellmask.models.rpn import build_rpn, match_chunk_value
from cellmask.models.sections import section
from cellmask.models.transform import build_transform

__all__ = [
    "CascadeBoxPredictor",
    "CascadeRCNN",
    "CascadeRoIHeads",
    "build_cascade_rcnn",
    "build_cascade_roi_heads",
]


class CascadeRCNN(GeneralizedRCNN):
    """Cascade (Mask) R-CNN: torchvision's ``GeneralizedRCNN`` with :class:`CascadeRoIHeads`.

    Train mode: ``model(images, targets) -> {loss_objectness, loss_rpn_box_reg,
    loss_classifier_s1..3, loss_box_reg_s1..3[, loss_mask]}`` (targets' ``masks`` at the image's
    own size: a :class:`~cellmask.data.layers.MaskWindows`, as ``DetectionDataset(with_masks=True)``
    gives, or a uint8 ``[N, H, W]`` stack); eval mode: ``model(images) -> [{"boxes" float32
    [N, 4], "labels", "scores"[, "masks": PastedMasks]}]`` in original image pixels.
    """

    roi_heads: CascadeRoIHeads

    def class_dependent_prefixes(self) -> list[str]:
        """State-dict key prefixes of the layers whose shape depends on ``num_classes``."""
        prefixes = [f"roi_heads.box_predictors.{k}.cls_score" for k in range(self.roi_heads.num_stages)]
        if self.roi_heads.has_mask():
            prefixes.append("roi_heads.mask_predictor.mask_fcn_logits")
        return prefixes


def build_cascade_roi_heads(
    model_cfg: Mapping[str, Any], in_channels: int, num_classes: int, with_mask: bool
) -> CascadeRoIHeads:
    """:class:`CascadeRoIHeads` from the ``roi``, ``cascade`` and (``with_mask``) ``mask`` sections.

    ``roi.fg_iou_thresh`` / ``roi.bg_iou_thresh`` (Faster R-CNN's single threshold) and
    ``roi.bbox_reg_weights`` are not used: each stage matches at its ``cascade.iou_thresholds``
    entry and encodes boxes with its ``cascade.bbox_reg_weights`` entry.
    """
    roi = section(model_cfg, "roi")
    cascade = section(model_cfg, "cascade")
    box_roi_pool = build_box_roi_pool(model_cfg)
    pool = box_roi_pool.output_size[0]
    rep = int(roi["representation_size"])
    n = len(cascade["iou_thresholds"])
    mask_kwargs = build_mask_branch(model_cfg, in_channels, num_classes) if with_mask else {}
    return CascadeRoIHeads(
        box_roi_pool,
        [TwoMLPHead(in_channels * pool * pool, rep) for _ in range(n)],
        [CascadeBoxPredictor(rep, num_classes) for _ in range(n)],
        iou_thresholds=cascade["iou_thresholds"],
        bbox_reg_weights=cascade["bbox_reg_weights"],
        stage_loss_weights=cascade["stage_loss_weights"],
        smooth_l1_beta=float(cascade["smooth_l1_beta"]),
        batch_size_per_image=int(roi["batch_size_per_image"]),
        positive_fraction=float(roi["positive_fraction"]),
        score_thresh=float(roi["score_thresh"]),
        nms_thresh=float(roi["nms_thresh"]),
        detections_per_img=int(roi["detections_per_img"]),
        match_chunk=match_chunk_value(roi["match_chunk"]),
        **mask_kwargs,
    )


def build_cascade_rcnn(
    model_cfg: Mapping[str, Any], num_classes: int, backbone: nn.Module | None = None
) -> CascadeRCNN:
    """Cascade R-CNN (``type: cascade_rcnn``) or Cascade Mask R-CNN (``type:
    cascade_mask_rcnn``, or ``mask.enabled: true``) from the model section of a config.

    Args:
        model_cfg: the complete ``cfg["model"]`` (sections ``backbone``, ``fpn``, ``anchor``,
            ``rpn``, ``roi``, ``transform``, ``cascade``, ``mask``; every key required).
        num_classes: including background (4 for the competition, 9 for LIVECell).
        backbone: a module returning FPN features ``'0'..'3','pool'`` with an
            ``out_channels`` attribute; ``None`` builds it from ``backbone``/``fpn``.

    Raises:
        ValueError: ``num_classes < 2``, a backbone without ``out_channels``, or a missing or
            unknown config key (named).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes includes background and must be >= 2, got {num_classes}")
    if backbone is None:
        backbone = build_model_backbone(model_cfg)
    if not hasattr(backbone, "out_channels"):
        raise ValueError("the backbone needs an `out_channels` attribute (channels of every FPN level)")
    with_mask = model_cfg.get("type") == "cascade_mask_rcnn" or bool(section(model_cfg, "mask")["enabled"])
    out_channels = int(backbone.out_channels)
    threshold = float(section(model_cfg, "mask")["threshold"]) if with_mask else None
    return CascadeRCNN(
        backbone,
        build_rpn(model_cfg, out_channels),
        build_cascade_roi_heads(model_cfg, out_channels, num_classes, with_mask),
        build_transform(model_cfg, mask_threshold=threshold),
    )
