"""The region proposal network every detector shares: torchvision's RPN with chunked matching
and float32 box arithmetic.

:class:`CellRPN` is a ``RegionProposalNetwork`` whose

- anchor matching (``assign_targets_to_anchors``) goes through
  :meth:`cellmask.models.matching.ChunkedMatcher.match`: the same result as torchvision's
  ``Matcher(box_iou(gt, anchors))`` (low-quality matches included) while holding only
  ``[G, match_chunk]`` IoUs (an 800x1088 input has ~362K anchors);
- box coder and anchor generator compute in float32 under autocast
  (:mod:`cellmask.models.box_coding`): proposals and regression targets are float32.

Everything else (head, proposal filtering, losses, attribute names, state_dict keys) is
torchvision's.

Config (``model.anchor``, ``model.rpn``; every key required, values in ``configs/base.yaml``):
``anchor.sizes`` (one list per FPN level P2..P6), ``anchor.aspect_ratios`` (h/w; one list, or
one per level); ``rpn.pre_nms_top_n_{train,test}`` (per level), ``rpn.post_nms_top_n_{train,test}``
(per image), ``nms_thresh``, ``fg_iou_thresh``, ``bg_iou_thresh``, ``batch_size_per_image``,
``positive_fraction``, ``score_thresh``, ``match_chunk`` (anchors per matching chunk, ``null``:
torchvision's full table).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from cellmask.models.box_coding import Float32AnchorGenerator, Float32BoxCoder
from cellmask.models.matching import ChunkedMatcher
from cellmask.models.sections import section

__all__ = ["CellRPN", "build_anchor_generator", "build_rpn", "build_rpn_head", "match_chunk_value"]


def match_chunk_value(value: Any) -> int | None:
    """A ``match_chunk`` config value: a positive int, or ``None`` (one full IoU table)."""
    return None if value is None else int(value)


class CellRPN(RegionProposalNetwork):
    """torchvision's RPN with chunked anchor matching and float32 boxes.

    Args: as ``RegionProposalNetwork``, plus ``match_chunk`` (anchors per matching chunk;
    ``None`` = torchvision's full ``[G, A]`` table).
    """

    def __init__(self, *args: Any, match_chunk: int | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.box_coder = Float32BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        m = self.proposal_matcher
        self.proposal_matcher = ChunkedMatcher(
            m.high_threshold, m.low_threshold, m.allow_low_quality_matches, chunk=match_chunk
        )

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: float32 labels ``[A]`` (1 object, 0 background, -1 ignored) and the
        matched truth box of every anchor, float32 ``[A, 4]`` (zeros without truth)."""
        labels, matched_gt_boxes = [], []
        matcher = self.proposal_matcher
        for anchors_per_image, target in zip(anchors, targets, strict=True):
            gt_boxes = target["boxes"].float()
            device = anchors_per_image.device
            if gt_boxes.numel() == 0:
                matched = torch.zeros(anchors_per_image.shape, dtype=torch.float32, device=device)
                label = torch.zeros(anchors_per_image.shape[0], dtype=torch.float32, device=device)
            else:
                idx = matcher.match(gt_boxes, anchors_per_image)
                matched = gt_boxes[idx.clamp(min=0)]
                label = (idx >= 0).to(torch.float32)
                label[idx == matcher.BELOW_LOW_THRESHOLD] = 0.0
                label[idx == matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(label)
            matched_gt_boxes.append(matched)
        return labels, matched_gt_boxes


def build_anchor_generator(model_cfg: Mapping[str, Any], num_levels: int = 5) -> Float32AnchorGenerator:
    """One anchor generator for the FPN levels: ``sizes[i]`` px at level i, every ratio at each
    (or ``aspect_ratios[i]`` at level i, given one list per level)."""
    a = section(model_cfg, "anchor")
    sizes = tuple(
        tuple(float(s) for s in (level if isinstance(level, list | tuple) else [level]))
        for level in a["sizes"]
    )
    if len(sizes) != num_levels:
        raise ValueError(f"model.anchor.sizes has {len(sizes)} levels, the FPN gives {num_levels} (P2..P6)")
    if len({len(s) for s in sizes}) != 1:
        raise ValueError(
            "model.anchor.sizes: every level needs the same number of sizes (one RPN head for all)"
        )
    ratios = a["aspect_ratios"]
    if ratios and isinstance(ratios[0], list | tuple):
        aspect_ratios = tuple(tuple(float(r) for r in level) for level in ratios)
    else:
        aspect_ratios = (tuple(float(r) for r in ratios),) * len(sizes)
    return Float32AnchorGenerator(sizes=sizes, aspect_ratios=aspect_ratios)


def build_rpn_head(in_channels: int, anchor_generator: Float32AnchorGenerator) -> RPNHead:
    """torchvision's RPN head (one 3x3 conv, then objectness + box deltas per anchor)."""
    return RPNHead(in_channels, anchor_generator.num_anchors_per_location()[0])


def build_rpn(model_cfg: Mapping[str, Any], in_channels: int) -> CellRPN:
    """The RPN of a ``model`` config section (anchors + head + proposal settings) for FPN maps of
    ``in_channels`` channels."""
    r = section(model_cfg, "rpn")
    anchors = build_anchor_generator(model_cfg)
    head: nn.Module = build_rpn_head(in_channels, anchors)
    return CellRPN(
        anchors,
        head,
        fg_iou_thresh=float(r["fg_iou_thresh"]),
        bg_iou_thresh=float(r["bg_iou_thresh"]),
        batch_size_per_image=int(r["batch_size_per_image"]),
        positive_fraction=float(r["positive_fraction"]),
        pre_nms_top_n={"training": int(r["pre_nms_top_n_train"]), "testing": int(r["pre_nms_top_n_test"])},
        post_nms_top_n={"training": int(r["post_nms_top_n_train"]), "testing": int(r["post_nms_top_n_test"])},
        nms_thresh=float(r["nms_thresh"]),
        score_thresh=float(r["score_thresh"]),
        match_chunk=match_chunk_value(r["match_chunk"]),
    )
