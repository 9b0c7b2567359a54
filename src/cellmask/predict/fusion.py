"""Weighted Boxes Fusion of the branches' (TTA) detections (``ensemble_boxes``).

The paper fuses the four branches with WBF (weights 2, 3, 3, 1; ``iou_thr`` 0.6; ``skip_box_thr``
0.01). How TTA enters: every (branch, view) pair is one WBF *model* carrying its branch's
weight, all in one call. So

- a box is clustered once, against every view of every branch (no two-stage fusion whose
  result would depend on which views were merged first);
- a branch's total weight is ``weight x views``: with every branch using the same views the
  paper's 2 : 3 : 3 : 1 ratio between branches is kept exactly;
- a box that both views of a branch find counts as two agreeing votes, one seen in only one
  view as one (WBF's ``avg`` confidence is rescaled by ``min(models, boxes in cluster) /
  sum of weights``), which is what TTA is meant to reward.

Boxes are normalised to ``[0, 1]`` by the image's width and height only for the
:func:`ensemble_boxes.weighted_boxes_fusion` call, and mapped back to pixels after it. Labels
are kept: WBF clusters each class on its own.

A single entry (one branch, TTA off) is returned unchanged: WBF of one model does not fuse
anything, it would only rescale and round its boxes, and the single-branch pipeline is the
baseline the ensemble is measured against (it must stay exactly that).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellmask.predict.tta import Detections

__all__ = ["fuse_detections"]


def fuse_detections(
    entries: Sequence[Detections],
    weights: Sequence[float],
    image_size: tuple[int, int],
    iou_thr: float = 0.6,
    skip_box_thr: float = 0.01,
    conf_type: str = "avg",
) -> Detections:
    """Fuse the detections of several models of one image.

    Args:
        entries: one :class:`Detections` per (branch, view), boxes in pixels.
        weights: one WBF weight per entry (the branch's ``ensemble.weight``).
        image_size: ``(H, W)`` of the image the boxes belong to.
        iou_thr, skip_box_thr, conf_type: :func:`ensemble_boxes.weighted_boxes_fusion`'s.

    Returns:
        fused :class:`Detections` in pixels, in descending score order (a single entry: itself).
    """
    if len(entries) != len(weights):
        raise ValueError(f"{len(entries)} detection entries but {len(weights)} weights")
    if not entries:
        return Detections.empty()
    if len(entries) == 1:
        return entries[0]
    height, width = (int(s) for s in image_size)
    scale = np.array([width, height, width, height], dtype=np.float64)
    boxes_list, scores_list, labels_list = [], [], []
    for det in entries:
        boxes_list.append(np.clip(det.boxes / scale, 0.0, 1.0))
        scores_list.append(det.scores.astype(np.float64))
        labels_list.append(det.labels)
    if not any(len(s) for s in scores_list):
        return Detections.empty()
    from ensemble_boxes import weighted_boxes_fusion  # imports numba (~1 s): only when fusing

    boxes, scores, labels = weighted_boxes_fusion(
        boxes_list,
        scores_list,
        labels_list,
        weights=[float(w) for w in weights],
        iou_thr=float(iou_thr),
        skip_box_thr=float(skip_box_thr),
        conf_type=conf_type,
    )
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale
    return Detections(boxes, np.asarray(scores), np.asarray(labels).round().astype(np.int64))
