"""Weighted Boxes Fusion of the branches' (TTA) detections (``ensemble_boxes``).

The paper fuses the four branches with WBF (weights 2, 3, 3, 1; ``iou_thr`` 0.6; ``skip_box_thr``
0.01) after flip TTA. How TTA enters is ``predict.tta_fusion`` (:func:`fuse_branches`):

``views``: every (branch, view) pair is one WBF *model* carrying its branch's
weight, all in one call (8 entries for 4 branches). A box is clustered once, against every view
of every branch; a branch's total weight is ``weight x views``, so with every branch using the
same views the 2 : 3 : 3 : 1 ratio between branches is kept.

``per_model`` (the default, the paper's reading, ``--paper-exact``): each branch's views are
merged into one set of boxes first, by WBF of those views with equal weights and the same
``iou_thr``, ``skip_box_thr`` and ``conf_type``; then WBF of the branches with their weights,
without the library's cap on a cluster's score (``allows_overflow``, scores clipped at 1; below). This is what
mmdet's flip TTA, which the paper's detectors ran, gives each model: every RoI is scored in both
views and its box and scores are *averaged* over them before that model's output exists. WBF's
``avg`` confidence of a cluster is ``sum(weight x score) x min(models, boxes) / sum of weights``,
so the equal-weight merge is that average (a box seen in one view only gets half its score, as
an RoI that the other view scores near 0 does in mmdet), and its box is the score-weighted mean.

Where the two readings differ. WBF's ``avg`` score of a cluster is ``sum(w x s) / sum(w)``
(while it has no more boxes than there are models), and its box the ``w x s``-weighted mean: the
same algebra in one step over 8 entries or in two (views, then branches). So when both readings
form the same clusters they give the same scores and boxes, one-view boxes halved in both. They
part where clustering differs: in one call, WBF clusters boxes greedily in descending
``w x s`` order, so another branch's box can claim one view of a branch and leave its other view
a cluster of its own (a duplicate cell at a low score); ``per_model`` reconciles each branch's
two views before the branches meet. Also, ``skip_box_thr`` applies to the view-averaged score
in the second stage (a one-view box under twice the threshold is dropped).
Why the second stage is uncapped. WBF's ``avg`` multiplies a cluster's mean ``w x s`` by
``min(models, boxes) / sum of weights``: a cluster with more boxes than models is scored as if
it had one box per model. A branch whose two views disagree (IoU under ``iou_thr``, or another
label) leaves the first stage as two half-score boxes, and when both join the other branches'
cluster it holds five boxes for four models: the cap cuts that cell's score by a fifth. mmdet's
flip TTA, which this stage stands for, never splits a branch's views (both views score the same
RoIs), so the cap is an artefact of the two-stage emulation. Measured on the synthetic demo's
val fold, where 25% of a branch's confident boxes have no flip-view match at IoU 0.6, the cap
lowered 20% of the matched cells' scores and cost 0.017 of the metric (0.199 against 0.216
uncapped and 0.220 for ``views``); on the real val fold it cost 0.001. Uncapped, the second
stage's score is ``sum(w x s) / sum(weights)``: the ``views`` algebra whenever the branches'
boxes form the same clusters. With one view per branch (no TTA) the cap stays, so the
ensemble without TTA is plain WBF of the branches.
``tests/test_predict_fusion.py`` derives both readings by hand. With one branch the two are
the same fusion (its two views with equal weights).

Boxes are normalised to ``[0, 1]`` by the image's width and height only for the
:func:`ensemble_boxes.weighted_boxes_fusion` call, and mapped back to pixels after it. Labels
are kept: WBF clusters each class on its own.

A single entry (one branch, TTA off) is returned unchanged: WBF of one model does not fuse
anything, it would only rescale and round its boxes, and the single-branch pipeline is the
baseline the ensemble is measured against (it must stay exactly that).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cellmask.predict.tta import Detections

__all__ = ["fuse_branches", "fuse_detections", "fuse_image"]


def fuse_detections(
    entries: Sequence[Detections],
    weights: Sequence[float],
    image_size: tuple[int, int],
    iou_thr: float = 0.6,
    skip_box_thr: float = 0.01,
    conf_type: str = "avg",
    allows_overflow: bool = False,
) -> Detections:
    """Fuse the detections of several models of one image.

    Args:
        entries: one :class:`Detections` per (branch, view), boxes in pixels.
        weights: one WBF weight per entry (the branch's ``ensemble.weight``).
        image_size: ``(H, W)`` of the image the boxes belong to.
        iou_thr, skip_box_thr, conf_type: :func:`ensemble_boxes.weighted_boxes_fusion`'s.
        allows_overflow: no ``min(models, boxes)`` cap on an ``avg`` cluster's score (the
            library's option); scores are clipped at 1.

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
        allows_overflow=bool(allows_overflow),
    )
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale
    scores = np.minimum(np.asarray(scores), 1.0) if allows_overflow else np.asarray(scores)
    return Detections(boxes, scores, np.asarray(labels).round().astype(np.int64))


def fuse_branches(
    branches: Sequence[Sequence[Detections]],
    weights: Sequence[float],
    image_size: tuple[int, int],
    iou_thr: float = 0.6,
    skip_box_thr: float = 0.01,
    conf_type: str = "avg",
    tta_fusion: str = "views",
) -> Detections:
    """Fuse several branches' TTA views of one image (module docstring).

    Args:
        branches: per branch, its :class:`Detections` per view (pixels).
        weights: one WBF weight per branch (its run's ``ensemble.weight``).
        image_size: ``(H, W)`` of the image.
        iou_thr, skip_box_thr, conf_type: :func:`ensemble_boxes.weighted_boxes_fusion`'s, used
            by both stages of ``per_model``.
        tta_fusion: ``"views"``: one WBF call, every (branch, view) one entry with its branch's
            weight; ``"per_model"``: each branch's views fused with equal weights, then the
            branches with ``weights``, uncapped when a branch has more than one view.

    Returns:
        fused :class:`Detections` in pixels (a single branch with a single view: itself).
    """
    if len(branches) != len(weights):
        raise ValueError(f"{len(branches)} branches but {len(weights)} weights")
    wbf = {"iou_thr": iou_thr, "skip_box_thr": skip_box_thr, "conf_type": conf_type}
    if tta_fusion == "views":
        entries = [det for views in branches for det in views]
        entry_weights = [w for views, w in zip(branches, weights, strict=True) for _ in views]
        return fuse_detections(entries, entry_weights, image_size, **wbf)
    if tta_fusion == "per_model":
        merged = [fuse_detections(views, [1.0] * len(views), image_size, **wbf) for views in branches]
        split_views = any(len(views) > 1 for views in branches)
        return fuse_detections(merged, weights, image_size, **wbf, allows_overflow=split_views)
    raise ValueError(f"tta_fusion must be 'views' or 'per_model', got {tta_fusion!r}")


def fuse_image(
    branches: Sequence[Sequence[Detections]],
    weights: Sequence[float],
    image_size: tuple[int, int],
    options: Mapping[str, Any],
) -> Detections:
    """:func:`fuse_branches` as a resolved ``predict`` section says: ``wbf``, ``tta_fusion`` and,
    with ``class_vote`` and ``vote_before_wbf``, every view of every branch relabelled to the
    image's class first (:func:`~cellmask.predict.pipeline.vote_entries`)."""
    if options["class_vote"] and options["vote_before_wbf"]:
        from cellmask.predict.pipeline import vote_entries

        voted = iter(vote_entries([d for views in branches for d in views], float(options["vote_min_score"])))
        branches = [[next(voted) for _ in views] for views in branches]
    wbf = options["wbf"]
    return fuse_branches(
        branches,
        weights,
        image_size,
        wbf["iou_thr"],
        wbf["skip_box_thr"],
        wbf["conf_type"],
        options["tta_fusion"],
    )
