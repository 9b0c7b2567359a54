"""Cascade R-CNN's RoI heads: a sequence of box heads at rising IoU thresholds (+ a mask head).

Same call signature as torchvision's ``RoIHeads``:
``forward(features, proposals, image_shapes, targets=None) -> (detections, losses)``.
The design (following mmdetection's ``CascadeRoIHead``, which the paper used) is described in
:mod:`cellmask.models.cascade_rcnn`. Box arithmetic is float32 under autocast (contract 9):
proposals, truth boxes, regression targets and refined/decoded boxes all are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from cellmask.models.box_coding import Float32BoxCoder
from cellmask.models.mask_head import mask_image_size, mask_loss, roi_mask_targets, rois_to_mask_pixels
from cellmask.models.matching import ChunkedMatcher, assign_proposals

__all__ = ["CascadeBoxPredictor", "CascadeRoIHeads"]


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

    Args:
        box_roi_pool: RoIAlign shared by the stages (e.g. 7x7 over FPN levels '0'..'3').
        box_heads: one feature head per stage (``TwoMLPHead``).
        box_predictors: one :class:`CascadeBoxPredictor` per stage.
        iou_thresholds: matcher threshold per stage (positive iff IoU >= t).
        bbox_reg_weights: ``BoxCoder`` weights per stage.
        stage_loss_weights: multiplier of each stage's losses.
        smooth_l1_beta: the box regression loss' SmoothL1 beta.
        batch_size_per_image, positive_fraction: the RoI sampler (shared by the stages).
        score_thresh, nms_thresh, detections_per_img: inference post-processing.
        match_chunk: proposals per matching chunk (``None``: one full IoU table).
        mask_roi_pool, mask_head, mask_predictor: the optional mask branch (all or none).
        mask_loss_weight: multiplier of ``loss_mask``.
        mask_sampling_ratio: bilinear samples per cell side of the mask targets.
    """

    def __init__(
        self,
        box_roi_pool: MultiScaleRoIAlign,
        box_heads: Sequence[nn.Module],
        box_predictors: Sequence[nn.Module],
        iou_thresholds: Sequence[float],
        bbox_reg_weights: Sequence[Sequence[float]],
        stage_loss_weights: Sequence[float],
        smooth_l1_beta: float,
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        match_chunk: int | None,
        mask_roi_pool: MultiScaleRoIAlign | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
        mask_loss_weight: float = 1.0,
        mask_sampling_ratio: int = 2,
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
            ChunkedMatcher(t, t, allow_low_quality_matches=False, chunk=match_chunk)
            for t in self.iou_thresholds
        ]
        self.box_coders = [Float32BoxCoder(tuple(float(v) for v in w)) for w in bbox_reg_weights]
        self.stage_loss_weights = [float(w) for w in stage_loss_weights]
        self.smooth_l1_beta = float(smooth_l1_beta)
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
        self.mask_sampling_ratio = int(mask_sampling_ratio)

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    def has_mask(self) -> bool:
        return self.mask_predictor is not None

    # ------------------------------------------------------------------ training targets
    def assign_targets_to_proposals(
        self, stage: int, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Match every proposal to its best truth at ``stage``'s IoU threshold.

        Returns ``(matched_idxs, labels)`` per image: the matched truth index (0 for
        background/empty images) and the class label (0 where IoU < threshold).
        """
        return assign_proposals(self.proposal_matchers[stage], proposals, gt_boxes, gt_labels)

    def select_training_samples(
        self, stage: int, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Append the truth boxes, match at ``stage``'s threshold, sample, encode targets.

        Returns per image ``(rois, matched_idxs, labels, regression_targets, is_gt)`` of the
        sampled RoIs (float32 rois and targets); ``is_gt`` flags the appended truth boxes.
        """
        gt_boxes = [t["boxes"].float() for t in targets]
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
        proposals = [torch.cat([p.float(), g]) for p, g in zip(proposals, gt_boxes, strict=True)]
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
                gtb = torch.zeros((1, 4), dtype=torch.float32, device=gtb.device)
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
        """Apply ``stage``'s (class-agnostic) deltas to ``rois``, clip to the image, detach (float32)."""
        per_image = [r.shape[0] for r in rois]
        if sum(per_image) == 0:
            return [r.detach().float() for r in rois]
        decoded = self.box_coders[stage].decode_single(deltas.detach(), torch.cat(rois).detach())
        return [
            box_ops.clip_boxes_to_image(b, shape)
            for b, shape in zip(decoded.split(per_image), image_shapes, strict=True)
        ]

    def box_loss(
        self, class_logits: Tensor, deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Cross entropy + SmoothL1 (``smooth_l1_beta``) on positives, normalised by the RoI count."""
        labels_t = torch.cat(labels)
        targets_t = torch.cat(regression_targets)
        loss_cls = F.cross_entropy(class_logits.float(), labels_t)
        pos = torch.where(labels_t > 0)[0]
        loss_box = F.smooth_l1_loss(
            deltas[pos].float(), targets_t[pos], beta=self.smooth_l1_beta, reduction="sum"
        )
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
        rois = [p.detach().float() for p in proposals]
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
                # the next stage re-appends the truth boxes itself: drop their refined copies
                rois = [r[~g] for r, g in zip(refined, is_gt, strict=True)]
        if self.has_mask():
            losses["loss_mask"] = self.mask_loss_weight * self._mask_train_loss(
                features, rois, labels, matched_idxs, image_shapes, targets
            )
        return losses

    def _forward_test(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        # mmdet's CascadeRoIHead.simple_test: stage k classifies and regresses its own RoIs (stage
        # 1 the proposals, stage k+1 stage k's refinement of them); the class logits are averaged
        # over the stages and then softmaxed; the boxes are the last stage's regression.
        rois = [p.float() for p in proposals]
        logit_sum: Tensor | None = None
        deltas: Tensor | None = None
        for k in range(self.num_stages):
            if deltas is not None:
                rois = self.refine_boxes(k - 1, deltas, rois, image_shapes)
            logits, deltas = self.run_stage(k, features, rois, image_shapes)
            logit_sum = logits.float() if logit_sum is None else logit_sum + logits.float()
        assert logit_sum is not None and deltas is not None
        probs = F.softmax(logit_sum / self.num_stages, -1)
        boxes = self.box_coders[-1].decode_single(deltas, torch.cat(rois))
        result = self.postprocess_detections(probs, boxes, [r.shape[0] for r in rois], image_shapes)
        if self.has_mask():
            mask_logits = self._mask_logits(features, [r["boxes"] for r in result], image_shapes)
            mask_probs = maskrcnn_inference(mask_logits.float(), [r["labels"] for r in result])
            for r, m in zip(result, mask_probs, strict=True):
                r["masks"] = m  # float32 [N, 1, M, M]: the transform pastes them into the image
        return result

    def postprocess_detections(
        self, probs: Tensor, boxes: Tensor, per_image: list[int], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per-class candidates -> score threshold -> small boxes out -> per-class NMS -> top-k.

        Args:
            probs: float32 ``[R, C]`` class probabilities (background first).
            boxes: float32 ``[R, 4]`` class-agnostic boxes in the transformed image's pixels.
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

    def mask_targets(
        self,
        rois: list[Tensor],
        matched_idxs: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
        size: int,
    ) -> Tensor:
        """Float32 ``[sum R_i, size, size]`` soft targets of RoIs (in the resized images' pixels)
        from windows of their matched truth masks (at any resolution, e.g. the original): each
        target's ``masks`` a :class:`~cellmask.data.layers.MaskWindows` (the datasets') or a
        ``[G, H, W]`` stack (:func:`~cellmask.models.mask_head.roi_mask_targets`)."""
        out = []
        for r, idx, shape, t in zip(rois, matched_idxs, image_shapes, targets, strict=True):
            masks = t["masks"]
            pixel_rois = rois_to_mask_pixels(r, shape, mask_image_size(masks))
            out.append(roi_mask_targets(masks, pixel_rois, idx, size, self.mask_sampling_ratio))
        return torch.cat(out)

    def _mask_train_loss(
        self,
        features: dict[str, Tensor],
        rois: list[Tensor],
        labels: list[Tensor],
        matched_idxs: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> Tensor:
        """``loss_mask`` on the last stage's positive sampled RoIs."""
        pos = [torch.where(lab > 0)[0] for lab in labels]
        pos_rois = [r[p] for r, p in zip(rois, pos, strict=True)]
        pos_idxs = [i[p] for i, p in zip(matched_idxs, pos, strict=True)]
        mask_logits = self._mask_logits(features, pos_rois, image_shapes)
        mask_targets = self.mask_targets(pos_rois, pos_idxs, image_shapes, targets, mask_logits.shape[-1])
        pos_labels = torch.cat([lab[p] for lab, p in zip(labels, pos, strict=True)])
        return mask_loss(mask_logits, pos_labels, mask_targets)
