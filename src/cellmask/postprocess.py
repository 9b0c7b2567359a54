"""Post-processing of predicted instances: per-class score thresholds, overlap removal, min area.

The competition scores each instance mask on its own and forbids overlapping predictions, so
the last step of inference (paper, section 4) is:

1. drop instances scoring below their class's threshold (:func:`filter_by_score`);
2. walk the rest in descending score order, each instance giving up the pixels already taken
   by a higher-scoring one (:func:`remove_overlaps`);
3. drop instances left smaller than their class's minimum area.

:func:`postprocess_instances` runs the three. Everything is numpy and pure: inputs are never
modified.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cellmask import CLASS_TO_LABEL, CLASSES

__all__ = [
    "DEFAULT_MIN_AREA",
    "DEFAULT_SCORE_THRESHOLDS",
    "filter_by_score",
    "min_area_for",
    "postprocess_instances",
    "remove_overlaps",
]

DEFAULT_SCORE_THRESHOLDS: dict[str, float] = {"shsy5y": 0.25, "cort": 0.55, "astro": 0.35}
"""The paper's per-class score thresholds (keep ``score >= threshold``)."""

# Minimum instance area in pixels, per class. Chosen from the real annotations in
# tests/fixtures/sartorius_real/train.csv (1167 instances of 6 images, areas via rle_area):
# the 1st percentile of instance areas, rounded down to a multiple of 10, so that at most ~1%
# of real cells would be dropped while slivers left by overlap removal go away.
#   shsy5y  891 cells: min 46, p1  85.6, p5 129.5, median 260  -> 80
#   cort     78 cells: min 84, p1  91.7, p5 116.4, median 204  -> 90
#   astro   198 cells: min 138, p1 150.8, p5 241.8, median 635.5 -> 150
DEFAULT_MIN_AREA: dict[str, int] = {"shsy5y": 80, "cort": 90, "astro": 150}
"""Per-class minimum instance area in pixels (near the 1st percentile of real cell areas)."""


def _class_values(
    labels: np.ndarray, by_class: Mapping[str, float], missing: float, dtype: type
) -> np.ndarray:
    """Look up ``by_class[CLASSES[label - 1]]`` for every label (``missing`` where absent).

    Args:
        labels: int ``[N]`` competition labels (1 shsy5y, 2 cort, 3 astro).
        by_class: class name -> value.
        missing: value for classes absent from ``by_class``.
        dtype: dtype of the result.

    Returns:
        ``[N]`` array of ``dtype``.

    Raises:
        ValueError: a key of ``by_class`` is not a class name, or a label is not 1..3.
    """
    unknown = [name for name in by_class if name not in CLASS_TO_LABEL]
    if unknown:
        raise ValueError(f"unknown class name(s) {unknown}: expected some of {list(CLASSES)}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(labels.shape)}")
    bad = ~np.isin(labels, list(CLASS_TO_LABEL.values()))
    if bad.any():
        raise ValueError(
            f"label {labels[bad][0].item()!r} is not a competition class label "
            f"(expected {sorted(CLASS_TO_LABEL.values())})"
        )
    table = np.full(len(CLASSES) + 1, missing, dtype=dtype)
    for name, value in by_class.items():
        table[CLASS_TO_LABEL[name]] = value
    return table[labels.astype(np.int64)]


def filter_by_score(
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: Mapping[str, float] | float = DEFAULT_SCORE_THRESHOLDS,
) -> np.ndarray:
    """Which instances reach their class's score threshold.

    Args:
        scores: float ``[N]`` confidence scores.
        labels: int ``[N]`` competition labels (1 shsy5y, 2 cort, 3 astro).
        thresholds: class name -> threshold (a class left out is not filtered), or one float
            for every class. Default: the paper's :data:`DEFAULT_SCORE_THRESHOLDS`.

    Returns:
        bool ``[N]``: ``scores >= threshold of the instance's class``.

    Raises:
        ValueError: a threshold key is not a class name (the message names it), a label is not
            1..3, or the shapes differ.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(
            f"scores and labels must both be [N], got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    if not isinstance(thresholds, Mapping):
        thresholds = dict.fromkeys(CLASSES, float(thresholds))
    per_instance = _class_values(labels, thresholds, missing=-np.inf, dtype=np.float64)
    return scores >= per_instance


def min_area_for(labels: np.ndarray, min_area_by_class: Mapping[str, int] | int) -> np.ndarray:
    """Per-instance minimum areas from per-class ones.

    Args:
        labels: int ``[N]`` competition labels (1 shsy5y, 2 cort, 3 astro).
        min_area_by_class: class name -> minimum area in pixels (a class left out gets 0), or
            one int for every class.

    Returns:
        int64 ``[N]``, ready for :func:`remove_overlaps`'s ``min_area``.

    Raises:
        ValueError: a key is not a class name, or a label is not 1..3.
    """
    if not isinstance(min_area_by_class, Mapping):
        min_area_by_class = dict.fromkeys(CLASSES, int(min_area_by_class))
    return _class_values(labels, min_area_by_class, missing=0, dtype=np.int64)


def remove_overlaps(
    masks: np.ndarray, scores: np.ndarray, min_area: int | np.ndarray = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Make instance masks disjoint; the higher score keeps contested pixels.

    Instances are visited in descending score order (ties: input order). Each one loses the
    pixels already claimed by a kept, higher-scoring instance; if fewer than its ``min_area``
    pixels remain (or none at all) it is dropped and claims nothing, so lower-scoring
    instances may still take its pixels. The work is done inside each instance's bounding
    box, against one ``[H, W]`` occupancy map; no ``[N, H, W]`` temporary is made (the result
    ``[K, H, W]`` is the only large allocation).

    Args:
        masks: bool (or 0/1 integer) ``[N, H, W]``.
        scores: float ``[N]``.
        min_area: minimum number of pixels an instance must keep: one int, or an int array
            ``[N]`` per instance (see :func:`min_area_for` for per-class minimums). An instance
            left empty is always dropped.

    Returns:
        ``(masks, keep)``: bool ``[K, H, W]`` disjoint masks of the kept instances in
        descending score order, and int64 ``[K]`` indices of those instances in the input.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    n = len(masks)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n,):
        raise ValueError(f"scores must be [N] = [{n}], got shape {tuple(scores.shape)}")
    min_areas = np.asarray(min_area, dtype=np.int64)
    if min_areas.ndim > 1 or (min_areas.ndim == 1 and min_areas.shape != (n,)):
        raise ValueError(f"min_area must be an int or [N] = [{n}], got shape {tuple(min_areas.shape)}")
    min_areas = np.broadcast_to(min_areas, (n,))
    order = np.argsort(-scores, kind="stable")
    return _claim_in_order(masks, order, min_areas)


def _claim_in_order(
    masks: np.ndarray, order: np.ndarray, min_areas: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Core of :func:`remove_overlaps`: visit ``masks[order]`` one by one, first come first served.

    Args:
        masks: bool or 0/1 ``[N, H, W]`` (never copied whole; instances not in ``order`` are
            never read).
        order: int ``[M]`` indices into ``masks``, highest priority first.
        min_areas: int64 ``[N]`` minimum remaining area per instance.

    Returns:
        bool ``[K, H, W]`` disjoint masks and int64 ``[K]`` indices into ``masks``.
    """
    _, height, width = masks.shape
    occupied = np.zeros((height, width), dtype=bool)
    kept: list[tuple[int, int, int, int, int, np.ndarray]] = []
    for i in np.asarray(order, dtype=np.int64).tolist():
        mask = masks[i] if masks.dtype == bool else masks[i] != 0
        rows = np.flatnonzero(mask.any(axis=1))
        if len(rows) == 0:
            continue
        y0, y1 = int(rows[0]), int(rows[-1]) + 1
        cols = np.flatnonzero(mask[y0:y1].any(axis=0))
        x0, x1 = int(cols[0]), int(cols[-1]) + 1
        crop = mask[y0:y1, x0:x1] & ~occupied[y0:y1, x0:x1]
        area = int(np.count_nonzero(crop))
        if area == 0 or area < min_areas[i]:
            continue
        occupied[y0:y1, x0:x1] |= crop
        kept.append((i, y0, y1, x0, x1, crop))

    out = np.zeros((len(kept), height, width), dtype=bool)
    for k, (_, y0, y1, x0, x1, crop) in enumerate(kept):
        out[k, y0:y1, x0:x1] = crop
    keep = np.array([item[0] for item in kept], dtype=np.int64)
    return out, keep


def postprocess_instances(
    masks: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: Mapping[str, float] | float | None = DEFAULT_SCORE_THRESHOLDS,
    min_area: Mapping[str, int] | int = DEFAULT_MIN_AREA,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score threshold, then overlap removal, then minimum area.

    Args:
        masks: bool ``[N, H, W]``.
        scores: float ``[N]``.
        labels: int ``[N]`` competition labels (1 shsy5y, 2 cort, 3 astro).
        thresholds: per-class score thresholds (see :func:`filter_by_score`); ``None`` keeps
            every score.
        min_area: per-class minimum areas in pixels (see :func:`min_area_for`), or one int.

    Returns:
        ``(masks, scores, labels)`` of the kept instances, in descending score order: bool
        ``[K, H, W]`` disjoint masks, float ``[K]`` scores (input dtype), int ``[K]`` labels.
    """
    masks = np.asarray(masks)
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if masks.ndim != 3 or len(masks) != len(scores) or len(scores) != len(labels):
        raise ValueError(
            f"expected masks [N, H, W], scores [N], labels [N]; got {tuple(masks.shape)}, "
            f"{tuple(scores.shape)}, {tuple(labels.shape)}"
        )
    if thresholds is None:
        selected = np.arange(len(scores))
    else:
        selected = np.flatnonzero(filter_by_score(scores, labels, thresholds))
    # Index into the input instead of copying masks[selected]: no extra [N, H, W] array.
    order = selected[np.argsort(-scores[selected].astype(np.float64), kind="stable")]
    out, keep = _claim_in_order(masks, order, min_area_for(labels, min_area))
    return out, scores[keep], labels[keep]
