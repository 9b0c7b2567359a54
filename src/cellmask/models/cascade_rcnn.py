"""Cascade R-CNN and Cascade Mask R-CNN on torchvision's detection parts (no mmdet).

Cascade R-CNN (Cai & Vasconcelos, CVPR 2018) replaces Faster R-CNN's single box head by a
sequence of heads trained at increasing IoU thresholds (0.5 / 0.6 / 0.7): each stage
regresses the boxes of the previous one, so later stages see better-localised RoIs and can be
trained at a stricter threshold without running out of positives. Branches 2 and 3 of
MDE-CellMask are Cascade R-CNNs (ResNeXt-101 / ResNeSt-101); the paper's baseline is a
Cascade Mask R-CNN (ResNeXt-101), i.e. the same detector with a mask head.

Everything here is built from torchvision parts: :class:`GeneralizedRCNN`,
:class:`GeneralizedRCNNTransform`, the RPN (:class:`RegionProposalNetwork`, :class:`RPNHead`,
:class:`AnchorGenerator`), :class:`MultiScaleRoIAlign`, ``BoxCoder``, ``Matcher``,
``BalancedPositiveNegativeSampler``, :class:`TwoMLPHead`, ``batched_nms``, the Mask R-CNN head
and predictor, ``maskrcnn_inference`` and the transform's mask pasting. The RPN, the transform,
the box RoIAlign and the sections ``anchor``, ``rpn``, ``roi`` and ``transform`` (same keys and
defaults as Faster R-CNN) come from :mod:`cellmask.models.faster_rcnn`'s shared builders.

Design choices (following mmdetection's ``CascadeRoIHead``, which the paper used):

* **Per stage**: its own ``TwoMLPHead`` + :class:`CascadeBoxPredictor` (``num_classes``
  logits, *class-agnostic* 4-d box regression), its own ``Matcher(t, t)`` (positive iff
  IoU >= t, negative otherwise, no low-quality matches) and its own ``BoxCoder`` whose
  weights tighten stage by stage ((10,10,5,5), (20,20,10,10), (30,30,15,15), i.e. target
  stds 0.1/0.2 -> 0.05/0.1 -> 0.033/0.067). One RoIAlign (7x7) and one sampler are shared.
* **Training**: stage 1 gets the RPN proposals with the gt boxes appended; it is matched at
  its threshold and sampled (``batch_size_per_image`` RoIs, ``positive_fraction``
  positives). Stage k+1 gets stage k's *sampled* RoIs regressed by stage k's head, clipped to
  the image and **detached** (no gradient flows from a stage's loss into earlier heads
  through the boxes), minus the RoIs that were appended gt boxes, plus the gt boxes appended
  afresh; then it is re-matched at its own threshold and re-sampled. Losses per stage
  (``loss_classifier_s{k}``, ``loss_box_reg_s{k}``, k = 1..3): cross entropy over the sampled
  RoIs + smooth-L1 (beta 1/9, summed over positives, divided by the number of sampled RoIs,
  as torchvision's ``fastrcnn_loss``), both multiplied by the stage loss weight (1 / 0.5 /
  0.25).
* **Inference**: RoIs are refined by stage 1 and stage 2; the final RoIs (stage 3's input)
  are pooled once and scored by **all three** classifiers; the class probabilities are the
  mean of the three *softmax* outputs (the Cascade R-CNN paper's "ensemble of classifiers at
  the last stage's RoIs"; mmdet instead averages each stage's logits on its own RoIs). The
  boxes are stage 3's regression of the final RoIs. Then, like torchvision: every
  (RoI, foreground class) pair is a candidate, score > ``score_thresh``, boxes smaller than
  0.01 px removed, per-class NMS (``nms_thresh``), top ``detections_per_img`` kept (any
  number, e.g. 1000; the RPN's ``post_nms_top_n_test`` bounds the RoIs, not the detections).
* **Mask head** (optional, the baseline): on the last stage only. RoIAlign 14x14 ->
  ``MaskRCNNHeads`` (4 x 256 convs) -> ``MaskRCNNPredictor`` (``num_classes`` 28x28 logits);
  trained on stage 3's positive sampled RoIs (targets = gt masks RoIAligned to 28x28,
  binary cross entropy on the gt class' channel, ``loss_mask`` times ``mask.loss_weight``,
  default 1); at inference computed for the final detections and pasted into the original
  image by ``GeneralizedRCNNTransform.postprocess`` (``masks`` float ``[N, 1, H, W]``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops import boxes as box_ops

# The RPN, transform, RoIAlign and config sections are Faster R-CNN's shared builders
# (``build_rpn`` / ``build_transform`` re-exported here).
from cellmask.models.faster_rcnn import (
    FPN_LEVELS,
    build_box_roi_pool,
    build_model_backbone,
    build_rpn,
    build_transform,
    section,
)

__all__ = [
    "DEFAULT_CASCADE",
    "CascadeBoxPredictor",
    "CascadeRCNN",
    "CascadeRoIHeads",
    "build_cascade_rcnn",
    "build_rpn",
    "build_transform",
]

#: Cascade R-CNN's three stages (cfg ``cascade``).
DEFAULT_CASCADE: dict[str, Any] = {
    "iou_thresholds": [0.5, 0.6, 0.7],
    "bbox_reg_weights": [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]],
    "stage_loss_weights": [1.0, 0.5, 0.25],
}
_DEFAULT_MASK: dict[str, Any] = {
    "enabled": False,
    "pool_size": 14,
    "sampling_ratio": 2,
    "layers": [256, 256, 256, 256],
    "dilation": 1,
    "dim_reduced": 256,
    "loss_weight": 1.0,
}


class CascadeBoxPredictor(nn.Module):
    """Per-stage predictor: class logits (``num_classes`` incl. background) and a
    class-agnostic box delta (4 outputs), as in Cascade R-CNN.

    Initialised like mmdetection's ``BBoxHead`` (normal std 0.01 for the classifier, 0.001
    for the regressor, zero biases), which keeps the untrained cascade's boxes stable.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class CascadeRoIHeads(nn.Module):
    """The cascade of box heads (+ optional mask head on the last stage).

    Same call signature as torchvision's ``RoIHeads``:
    ``forward(features, proposals, image_shapes, targets=None) -> (detections, losses)``.

    Args:
        box_roi_pool: RoIAlign shared by the stages (e.g. 7x7 over FPN levels '0'..'3').
        box_heads: one feature head per stage (``TwoMLPHead``).
        box_predictors: one :class:`CascadeBoxPredictor` per stage.
        iou_thresholds: matcher threshold per stage (positive iff IoU >= t).
        bbox_reg_weights: ``BoxCoder`` weights per stage.
        stage_loss_weights: multiplier of each stage's losses.
        batch_size_per_image, positive_fraction: the RoI sampler (shared by the stages).
        score_thresh, nms_thresh, detections_per_img: inference post-processing.
        mask_roi_pool, mask_head, mask_predictor: the optional mask branch (all or none).
        mask_loss_weight: multiplier of ``loss_mask``.
    """

    def __init__(
        self,
        box_roi_pool: MultiScaleRoIAlign,
        box_heads: Sequence[nn.Module],
        box_predictors: Sequence[nn.Module],
        iou_thresholds: Sequence[float],
        bbox_reg_weights: Sequence[Sequence[float]],
        stage_loss_weights: Sequence[float],
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 1000,
        mask_roi_pool: MultiScaleRoIAlign | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
        mask_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        n = len(box_heads)
        lengths = {
            "box_predictors": len(box_predictors),
            "iou_thresholds": len(iou_thresholds),
            "bbox_reg_weights": len(bbox_reg_weights),
            "stage_loss_weights": len(stage_loss_weights),
        }
        if n == 0 or any(v != n for v in lengths.values()):
            raise ValueError(f"cascade needs one entry per stage: {len(box_heads)} box_heads, {lengths}")
        for w in bbox_reg_weights:
            if len(w) != 4:
                raise ValueError(f"bbox_reg_weights entries must have 4 values, got {list(w)}")
        masks_given = [m is not None for m in (mask_roi_pool, mask_head, mask_predictor)]
        if any(masks_given) and not all(masks_given):
            raise ValueError("mask_roi_pool, mask_head and mask_predictor must be given together")

        self.box_roi_pool = box_roi_pool
        self.box_heads = nn.ModuleList(box_heads)
        self.box_predictors = nn.ModuleList(box_predictors)
        self.iou_thresholds = [float(t) for t in iou_thresholds]
        self.proposal_matchers = [
            det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in self.iou_thresholds
        ]
        self.box_coders = [
            det_utils.BoxCoder(tuple(float(v) for v in w), bbox_xform_clip=math.log(1000.0 / 16))
            for w in bbox_reg_weights
        ]
        self.stage_loss_weights = [float(w) for w in stage_loss_weights]
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(
            batch_size_per_image, positive_fraction
        )
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.mask_loss_weight = float(mask_loss_weight)

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    def has_mask(self) -> bool:
        return self.mask_predictor is not None

    # ------------------------------------------------------------------ training targets
    def assign_targets_to_proposals(
        self, stage: int, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Match every proposal to its best gt at ``stage``'s IoU threshold.

        Returns ``(matched_idxs, labels)`` per image: the matched gt index (0 for
        background/empty images) and the class label (0 where IoU < threshold).
        """
        matcher = self.proposal_matchers[stage]
        matched_idxs, labels = [], []
        for props, gtb, gtl in zip(proposals, gt_boxes, gt_labels, strict=True):
            if gtb.numel() == 0:
                idx = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                lab = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
            else:
                match = matcher(box_ops.box_iou(gtb, props))
                idx = match.clamp(min=0)
                lab = gtl[idx].to(torch.int64)
                lab[match == matcher.BELOW_LOW_THRESHOLD] = 0
                lab[match == matcher.BETWEEN_THRESHOLDS] = -1  # never happens with low == high
            matched_idxs.append(idx)
            labels.append(lab)
        return matched_idxs, labels

    def select_training_samples(
        self, stage: int, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Append the gt boxes, match at ``stage``'s threshold, sample, encode targets.

        Returns per image ``(rois, matched_idxs, labels, regression_targets, is_gt)`` of the
        sampled RoIs; ``is_gt`` flags the RoIs that are appended gt boxes.
        """
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        is_gt = [
            torch.cat(
                [
                    torch.zeros(p.shape[0], dtype=torch.bool, device=p.device),
                    torch.ones(g.shape[0], dtype=torch.bool, device=p.device),
                ]
            )
            for p, g in zip(proposals, gt_boxes, strict=True)
        ]
        proposals = [torch.cat([p, g]) for p, g in zip(proposals, gt_boxes, strict=True)]
        matched_idxs, labels = self.assign_targets_to_proposals(stage, proposals, gt_boxes, gt_labels)
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        rois, matched_gt_boxes = [], []
        for i in range(len(proposals)):
            keep = torch.where(sampled_pos[i] | sampled_neg[i])[0]
            rois.append(proposals[i][keep])
            labels[i] = labels[i][keep]
            matched_idxs[i] = matched_idxs[i][keep]
            is_gt[i] = is_gt[i][keep]
            gtb = gt_boxes[i]
            if gtb.numel() == 0:
                gtb = torch.zeros((1, 4), dtype=dtype, device=gtb.device)
            matched_gt_boxes.append(gtb[matched_idxs[i]])
        regression_targets = list(self.box_coders[stage].encode(matched_gt_boxes, rois))
        return rois, matched_idxs, labels, regression_targets, is_gt

    # ------------------------------------------------------------------ stage pieces
    def run_stage(
        self, stage: int, features: dict[str, Tensor], rois: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """RoIAlign ``rois`` and run ``stage``'s head -> ``(class_logits [R, C], deltas [R, 4])``."""
        x = self.box_roi_pool(features, rois, image_shapes)
        return self.box_predictors[stage](self.box_heads[stage](x))

    def refine_boxes(
        self, stage: int, deltas: Tensor, rois: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """Apply ``stage``'s (class-agnostic) deltas to ``rois``, clip to the image, detach."""
        per_image = [r.shape[0] for r in rois]
        if sum(per_image) == 0:
            return [r.detach() for r in rois]
        decoded = self.box_coders[stage].decode_single(
            deltas.detach().float(), torch.cat(rois).detach().float()
        )
        return [
            box_ops.clip_boxes_to_image(b, shape)
            for b, shape in zip(decoded.split(per_image), image_shapes, strict=True)
        ]

    @staticmethod
    def box_loss(
        class_logits: Tensor, deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Cross entropy + smooth-L1 (beta 1/9) on positives, normalised by the RoI count."""
        labels_t = torch.cat(labels)
        targets_t = torch.cat(regression_targets)
        loss_cls = F.cross_entropy(class_logits.float(), labels_t)
        pos = torch.where(labels_t > 0)[0]
        loss_box = F.smooth_l1_loss(deltas[pos].float(), targets_t[pos].float(), beta=1 / 9, reduction="sum")
        return loss_cls, loss_box / max(labels_t.numel(), 1)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            return [], self._forward_train(features, proposals, image_shapes, self._check_targets(targets))
        return self._forward_test(features, proposals, image_shapes), {}

    def _check_targets(self, targets: list[dict[str, Tensor]] | None) -> list[dict[str, Tensor]]:
        if targets is None:
            raise ValueError("targets are required in training mode")
        for t in targets:
            if "boxes" not in t or "labels" not in t:
                raise ValueError("every target needs 'boxes' and 'labels'")
            if not t["boxes"].is_floating_point():
                raise TypeError(f"target boxes must be floating point, got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must be int64, got {t['labels'].dtype}")
            if self.has_mask() and "masks" not in t:
                raise ValueError("the mask head needs 'masks' in every target")
        return targets

    def _forward_train(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        rois = [p.detach() for p in proposals]
        labels: list[Tensor] = []
        matched_idxs: list[Tensor] = []
        for k in range(self.num_stages):
            rois, matched_idxs, labels, reg_targets, is_gt = self.select_training_samples(k, rois, targets)
            class_logits, deltas = self.run_stage(k, features, rois, image_shapes)
            loss_cls, loss_box = self.box_loss(class_logits, deltas, labels, reg_targets)
            w = self.stage_loss_weights[k]
            losses[f"loss_classifier_s{k + 1}"] = loss_cls * w
            losses[f"loss_box_reg_s{k + 1}"] = loss_box * w
            if k < self.num_stages - 1:
                refined = self.refine_boxes(k, deltas, rois, image_shapes)
                # the next stage re-appends the gt boxes itself: drop their refined copies
                rois = [r[~g] for r, g in zip(refined, is_gt, strict=True)]
        if self.has_mask():
            pos_rois, pos_idxs = [], []
            for r, lab, idx in zip(rois, labels, matched_idxs, strict=True):
                pos = torch.where(lab > 0)[0]
                pos_rois.append(r[pos])
                pos_idxs.append(idx[pos])
            mask_logits = self._mask_logits(features, pos_rois, image_shapes)
            loss_mask = self.mask_loss(mask_logits, pos_rois, targets, pos_idxs)
            losses["loss_mask"] = loss_mask * self.mask_loss_weight
        return losses

    def _forward_test(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        rois = proposals
        for k in range(self.num_stages - 1):
            _, deltas = self.run_stage(k, features, rois, image_shapes)
            rois = self.refine_boxes(k, deltas, rois, image_shapes)
        # all stages' classifiers on the last stage's RoIs; softmax averaged
        pooled = self.box_roi_pool(features, rois, image_shapes)
        probs = None
        deltas = None
        for k in range(self.num_stages):
            logits, deltas = self.box_predictors[k](self.box_heads[k](pooled))
            p = F.softmax(logits.float(), -1)
            probs = p if probs is None else probs + p
        assert probs is not None and deltas is not None
        probs = probs / self.num_stages
        boxes = self.box_coders[-1].decode_single(deltas.float(), torch.cat(rois).float())
        result = self.postprocess_detections(probs, boxes, [r.shape[0] for r in rois], image_shapes)
        if self.has_mask():
            det_boxes = [r["boxes"] for r in result]
            mask_logits = self._mask_logits(features, det_boxes, image_shapes)
            mask_probs = maskrcnn_inference(mask_logits, [r["labels"] for r in result])
            for r, m in zip(result, mask_probs, strict=True):
                r["masks"] = m.float()  # float32 even under autocast (the contract's dtype)
        return result

    def postprocess_detections(
        self, probs: Tensor, boxes: Tensor, per_image: list[int], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per-class candidates -> score threshold -> small boxes out -> per-class NMS -> top-k.

        Args:
            probs: ``[R, C]`` class probabilities (background first).
            boxes: ``[R, 4]`` class-agnostic boxes in the transformed image's pixels.
            per_image: RoI count per image.
        """
        num_classes = probs.shape[-1]
        out = []
        for scores, bxs, shape in zip(
            probs.split(per_image), boxes.split(per_image), image_shapes, strict=True
        ):
            bxs = box_ops.clip_boxes_to_image(bxs, shape)
            labels = torch.arange(num_classes, device=probs.device).view(1, -1).expand_as(scores)
            scores = scores[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)
            bxs = bxs[:, None, :].expand(-1, num_classes - 1, 4).reshape(-1, 4)
            keep = torch.where(scores > self.score_thresh)[0]
            bxs, scores, labels = bxs[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(bxs, min_size=1e-2)
            bxs, scores, labels = bxs[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(bxs, scores, labels, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": bxs[keep], "labels": labels[keep], "scores": scores[keep]})
        return out

    # ------------------------------------------------------------------ masks
    def _mask_logits(
        self, features: dict[str, Tensor], rois: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        assert self.mask_roi_pool is not None and self.mask_head is not None
        assert self.mask_predictor is not None
        x = self.mask_roi_pool(features, rois, image_shapes)
        return self.mask_predictor(self.mask_head(x))

    @staticmethod
    def mask_loss(
        mask_logits: Tensor, rois: list[Tensor], targets: list[dict[str, Tensor]], matched_idxs: list[Tensor]
    ) -> Tensor:
        """BCE between the gt class' mask logits and the gt masks RoIAligned onto ``rois``."""
        size = mask_logits.shape[-1]
        mask_targets, labels = [], []
        for r, idx, t in zip(rois, matched_idxs, targets, strict=True):
            if r.shape[0] == 0:
                continue
            # only the matched gt masks go to float (a LIVECell image can hold 1000+ instances)
            used, inverse = torch.unique(idx, return_inverse=True)
            gt = t["masks"][used][:, None].to(r)
            idx_rois = torch.cat([inverse.to(r)[:, None], r], dim=1)
            mask_targets.append(roi_align(gt, idx_rois, (size, size), 1.0)[:, 0])
            labels.append(t["labels"][idx])
        if not mask_targets:
            return mask_logits.sum() * 0
        labels_t = torch.cat(labels)
        logits = mask_logits[torch.arange(labels_t.shape[0], device=labels_t.device), labels_t]
        return F.binary_cross_entropy_with_logits(logits, torch.cat(mask_targets))


class CascadeRCNN(GeneralizedRCNN):
    """Cascade (Mask) R-CNN: torchvision's ``GeneralizedRCNN`` with :class:`CascadeRoIHeads`.

    Train mode: ``model(images, targets) -> {loss_objectness, loss_rpn_box_reg,
    loss_classifier_s1..3, loss_box_reg_s1..3[, loss_mask]}``; eval mode: ``model(images) ->
    [{"boxes", "labels", "scores"[, "masks" [N,1,H,W]]}]`` in original image pixels.
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
    """:class:`CascadeRoIHeads` from cfg ``roi``, ``cascade`` and ``mask``.

    ``roi.fg_iou_thresh`` / ``roi.bg_iou_thresh`` (Faster R-CNN's single threshold) and
    ``roi.bbox_reg_weights`` are not used: each stage matches at its ``cascade.iou_thresholds``
    entry and encodes boxes with its ``cascade.bbox_reg_weights`` entry.
    """
    roi = section(model_cfg, "roi")
    cascade = section(model_cfg, "cascade", DEFAULT_CASCADE)
    box_roi_pool = build_box_roi_pool(model_cfg)
    pool = box_roi_pool.output_size[0]
    rep = int(roi["representation_size"])
    n = len(cascade["iou_thresholds"])
    mask_kwargs: dict[str, Any] = {}
    if with_mask:
        mask = section(model_cfg, "mask", _DEFAULT_MASK)
        layers = tuple(int(c) for c in mask["layers"])
        mask_kwargs = {
            "mask_roi_pool": MultiScaleRoIAlign(
                FPN_LEVELS, output_size=int(mask["pool_size"]), sampling_ratio=int(mask["sampling_ratio"])
            ),
            "mask_head": MaskRCNNHeads(in_channels, layers, int(mask["dilation"])),
            "mask_predictor": MaskRCNNPredictor(layers[-1], int(mask["dim_reduced"]), num_classes),
            "mask_loss_weight": float(mask["loss_weight"]),
        }
    return CascadeRoIHeads(
        box_roi_pool,
        [TwoMLPHead(in_channels * pool * pool, rep) for _ in range(n)],
        [CascadeBoxPredictor(rep, num_classes) for _ in range(n)],
        iou_thresholds=cascade["iou_thresholds"],
        bbox_reg_weights=cascade["bbox_reg_weights"],
        stage_loss_weights=cascade["stage_loss_weights"],
        batch_size_per_image=int(roi["batch_size_per_image"]),
        positive_fraction=float(roi["positive_fraction"]),
        score_thresh=float(roi["score_thresh"]),
        nms_thresh=float(roi["nms_thresh"]),
        detections_per_img=int(roi["detections_per_img"]),
        **mask_kwargs,
    )


def build_cascade_rcnn(
    model_cfg: Mapping[str, Any], num_classes: int, backbone: nn.Module | None = None
) -> CascadeRCNN:
    """Cascade R-CNN (``type: cascade_rcnn``) or Cascade Mask R-CNN (``type:
    cascade_mask_rcnn``, or ``mask.enabled: true``) from the model section of a config.

    Args:
        model_cfg: ``cfg["model"]`` (sections ``backbone``, ``fpn``, ``anchor``, ``rpn``,
            ``roi``, ``transform``, ``cascade``, ``mask``; missing keys take the paper's
            defaults).
        num_classes: including background (4 for the competition, 9 for LIVECell).
        backbone: a module returning FPN features ``'0'..'3','pool'`` with an
            ``out_channels`` attribute; ``None`` builds it with
            :func:`cellmask.models.backbones.build_backbone` from ``backbone``/``fpn``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes includes background and must be >= 2, got {num_classes}")
    if backbone is None:
        backbone = build_model_backbone(model_cfg)
    if not hasattr(backbone, "out_channels"):
        raise ValueError("the backbone needs an `out_channels` attribute (channels of every FPN level)")
    with_mask = model_cfg.get("type") == "cascade_mask_rcnn" or bool(
        (model_cfg.get("mask") or {}).get("enabled")
    )
    out_channels = int(backbone.out_channels)
    return CascadeRCNN(
        backbone,
        build_rpn(model_cfg, out_channels),
        build_cascade_roi_heads(model_cfg, out_channels, num_classes, with_mask),
        build_transform(model_cfg),
    )
