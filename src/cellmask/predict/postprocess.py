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

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cellmask.data.classes import CLASS_TO_LABEL, CLASSES

__all__ = [
    "DEFAULT_MIN_AREA",
    "DEFAULT_SCORE_THRESHOLDS",
    "filter_by_score",
    "min_area_for",
    "min_area_from_areas",
    "postprocess_instances",
    "remove_overlaps",
    "remove_overlaps_windows",
]

DEFAULT_SCORE_THRESHOLDS: dict[str, float] = {"shsy5y": 0.25, "cort": 0.55, "astro": 0.35}
"""The paper's per-class score thresholds (keep ``score >= threshold``)."""

# Minimum instance area in pixels, per class: min_area_from_areas() (the 1st percentile of the
# class's instance areas, rounded down to a multiple of 10) applied to the real annotations in
# tests/fixtures/sartorius_real/train.csv (1167 instances of 6 images, areas via rle_area), so
# that about 1% of real cells would be dropped while slivers left by overlap removal go away:
#   shsy5y  891 cells: min 46, p1  85.6, p5 129.5, median 260  -> 80
#   cort     78 cells: min 84, p1  91.7, p5 116.4, median 204  -> 90
#   astro   198 cells: min 138, p1 150.8, p5 241.8, median 635.5 -> 150
# The paper uses none (predict option min_area: 0).
DEFAULT_MIN_AREA: dict[str, int] = {"shsy5y": 80, "cort": 90, "astro": 150}
"""Per-class minimum instance area in pixels (near the 1st percentile of real cell areas)."""


def min_area_from_areas(
    areas_by_class: Mapping[str, Sequence[int] | np.ndarray], quantile: float = 0.01, step: int = 10
) -> dict[str, int]:
    """The rule behind :data:`DEFAULT_MIN_AREA`: per class, the ``quantile`` of the instance
    areas (numpy's linear interpolation), rounded down to a multiple of ``step``.

    Rounding down keeps the promise: at most about ``quantile`` of the cells the areas came from
    are smaller than the result.

    Raises:
        ValueError: a class without any area, or ``quantile`` outside [0, 1].
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    out = {}
    for name, areas in areas_by_class.items():
        areas = np.asarray(areas, dtype=np.float64)
        if areas.size == 0:
            raise ValueError(f"class {name!r}: no instance areas")
        out[name] = int(np.quantile(areas, quantile) // step * step)
    return out


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


def _tight_window(mask: np.ndarray) -> tuple[int, int, np.ndarray] | None:
    """``(y0, x0, mask[y0:y1, x0:x1])`` of a 2-D mask's bounding box, or ``None`` if empty."""
    mask = mask if mask.dtype == bool else mask != 0
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return None
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(mask[y0:y1].any(axis=0))
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    return y0, x0, mask[y0:y1, x0:x1]


def _claim(
    window_of: Callable[[int], tuple[int, int, np.ndarray] | None],
    order: np.ndarray,
    min_areas: np.ndarray,
    image_size: tuple[int, int],
) -> list[tuple[int, int, int, np.ndarray]]:
    """Core of the overlap removal: visit instances in ``order``, first come first served.

    Args:
        window_of: ``i -> (y0, x0, bool window)`` of instance ``i`` in the image (``None``:
            empty); only instances in ``order`` are asked for.
        order: int ``[M]`` instance indices, highest priority first.
        min_areas: int64 ``[N]`` minimum remaining area per instance.
        image_size: ``(H, W)``; windows are clipped to it.

    Returns:
        ``(i, y0, x0, window)`` of each kept instance in visiting order: the pixels it keeps,
        disjoint from every earlier one. Work and memory: one ``[H, W]`` occupancy map plus the
        windows (no ``[N, H, W]`` array).
    """
    height, width = (int(s) for s in image_size)
    occupied = np.zeros((height, width), dtype=bool)
    kept: list[tuple[int, int, int, np.ndarray]] = []
    for i in np.asarray(order, dtype=np.int64).tolist():
        found = window_of(i)
        if found is None:
            continue
        y0, x0, win = found
        win = np.asarray(win, dtype=bool)
        if y0 < 0 or x0 < 0:  # clip a window that starts outside the image
            win = win[max(0, -y0) :, max(0, -x0) :]
            y0, x0 = max(0, y0), max(0, x0)
        y1, x1 = min(y0 + win.shape[0], height), min(x0 + win.shape[1], width)
        if y1 <= y0 or x1 <= x0:
            continue
        crop = win[: y1 - y0, : x1 - x0] & ~occupied[y0:y1, x0:x1]
        area = int(np.count_nonzero(crop))
        if area == 0 or area < min_areas[i]:
            continue
        occupied[y0:y1, x0:x1] |= crop
        kept.append((i, y0, x0, crop))
    return kept


def _claim_in_order(
    masks: np.ndarray, order: np.ndarray, min_areas: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_claim` over dense masks ``[N, H, W]`` (never copied whole; instances not in
    ``order`` are never read): bool ``[K, H, W]`` disjoint masks and int64 ``[K]`` indices."""
    _, height, width = masks.shape
    kept = _claim(lambda i: _tight_window(masks[i]), order, min_areas, (height, width))
    out = np.zeros((len(kept), height, width), dtype=bool)
    for k, (_, y0, x0, crop) in enumerate(kept):
        out[k, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    keep = np.array([item[0] for item in kept], dtype=np.int64)
    return out, keep


def remove_overlaps_windows(
    windows: Sequence[np.ndarray],
    offsets: np.ndarray,
    scores: np.ndarray,
    image_size: tuple[int, int],
    min_area: int | np.ndarray = 0,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """:func:`remove_overlaps` for masks stored as windows (what the segmenter's paste gives).

    Args:
        windows: ``N`` bool ``[h_i, w_i]`` arrays, mask ``i``'s pixels from ``offsets[i]``.
        offsets: int ``[N, 2]``, ``(row, col)`` of each window's top-left pixel.
        scores: float ``[N]``: the higher score keeps contested pixels (ties: input order).
        image_size: ``(H, W)``.
        min_area: one int or int ``[N]``; an instance left smaller (or empty) is dropped and
            claims nothing.

    Returns:
        ``(windows, offsets, keep)`` of the kept instances in descending score order: their
        disjoint windows (within the tight box of each input mask), int64 ``[K, 2]`` offsets and int64 ``[K]``
        indices into the input.
    """
    n = len(windows)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64)
    if len(offsets) != n or scores.shape != (n,):
        raise ValueError(
            f"expected {n} offsets [N, 2] and scores [N], got {offsets.shape} and {scores.shape}"
        )
    min_areas = np.broadcast_to(np.asarray(min_area, dtype=np.int64), (n,))

    def window_of(i: int) -> tuple[int, int, np.ndarray] | None:
        found = _tight_window(np.asarray(windows[i], dtype=bool)) if np.size(windows[i]) else None
        if found is None:
            return None
        dy, dx, win = found
        return int(offsets[i, 0]) + dy, int(offsets[i, 1]) + dx, win

    kept = _claim(window_of, np.argsort(-scores, kind="stable"), min_areas, image_size)
    out_offsets = np.array([[y0, x0] for _, y0, x0, _ in kept], dtype=np.int64).reshape(-1, 2)
    keep = np.array([item[0] for item in kept], dtype=np.int64)
    return [crop for *_, crop in kept], out_offsets, keep


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
