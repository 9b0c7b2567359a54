"""The competition metric of *Sartorius - Cell Instance Segmentation*, exact and fast.

Per image, for every threshold ``t`` in ``0.50, 0.55, ..., 0.95`` (:data:`THRESHOLDS`), a truth
and a prediction *match* when their mask IoU is strictly greater than ``t``. Then

- TP = truths with exactly one matching prediction,
- FP = predictions matching no truth,
- FN = truths matching no prediction,
- ``precision(t) = TP / (TP + FP + FN)``;

the image score is the mean over the thresholds and the final score the mean over images.
Conventions where the formula is silent:

- no truth and no prediction: precision 1 at every threshold; no truth but predictions, or
  truth but no predictions: 0;
- ``TP + FP + FN == 0`` with instances present (every truth matched by two or more
  predictions, every prediction matching a truth): precision 0 -- nothing was found exactly
  once. Note what the formula implies: a truth matched twice is neither TP nor FN, and its two
  matching predictions are not FP, so a duplicated prediction of a cell costs nothing, except where
  it leaves TP + FP + FN at 0.

IoU is exact, from the instance masks themselves (masks may overlap, on either side), and is
computed on RLE runs, never on dense ``[N, H, W]`` stacks: each truth run is compared with the
prediction runs it can overlap (binary search), so the cost grows with the runs, not with the
pixels or with ``T x P``. It agrees with ``pycocotools.mask.iou`` (the tests check it).

Speed (``cellmask score``; ``benchmarks/bench_metric.py``): RLE text is parsed by one
``np.fromstring`` per image, or per file when scoring files (a bytes-level CSV scan that
falls back to the ``csv`` module for anything unusual); the import path is numpy and the
standard library only, so the command starts in about the time numpy takes to import.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from cellmask import CLASSES
from cellmask.data.rle import rle_to_runs, runs_to_indices
from cellmask.errors import DataError

__all__ = [
    "THRESHOLDS",
    "TRUTH_COLUMNS",
    "RLEError",
    "Runs",
    "ScoreReport",
    "TruthImage",
    "cli_score",
    "format_report",
    "image_precision",
    "iou_from_runs",
    "iou_matrix",
    "iou_pairs_from_runs",
    "plot_per_threshold",
    "precision_from_pairs",
    "read_truth_csv",
    "rles_to_runs",
    "score_files",
    "score_submission",
]

THRESHOLDS: np.ndarray = np.arange(50, 100, 5) / 100
"""float64 ``[10]``: ``0.50, 0.55, ..., 0.95``, each the double nearest to its decimal (a
correctly rounded ``k / 100``; ``np.linspace(0.5, 0.95, 10)`` would give ``0.8999999999999999``
for 0.9). A match needs ``iou > t``, strictly."""

TRUTH_COLUMNS = ("id", "annotation", "width", "height")
"""Columns a truth CSV (the competition's ``train.csv``) must have; ``cell_type`` is optional."""


# ----------------------------------------------------------------------------------------------
# RLE parsing for a whole image at once
# ----------------------------------------------------------------------------------------------

Runs = tuple[np.ndarray, np.ndarray, np.ndarray, int]
"""``(starts, lengths, owner, n)`` of one image's ``n`` instances: int64 ``[R]`` run starts
(0-indexed flat pixel indices), run lengths and each run's instance index, as
:func:`rles_to_runs` returns."""


class RLEError(ValueError):
    """A malformed RLE in a list of RLEs; ``index`` is its position in the list given."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def rles_to_runs(rles: Sequence[str], height: int, width: int) -> Runs:
    """Parse and validate the RLEs of one image, all at once.

    Empty (or whitespace-only) strings are skipped: they are "no instance", as an empty
    ``predicted`` cell in a submission is.

    Args:
        rles: ``N`` row-major, 1-indexed RLE strings (see :mod:`cellmask.data.rle`).
        height, width: the image size.

    Returns:
        ``(starts, lengths, owner, n)``: int64 ``[R]`` arrays of 0-indexed flat run starts, run
        lengths and the instance index (``0..n-1``, in list order, empties skipped) of each run,
        and ``n`` the number of non-empty instances.

    Raises:
        RLEError: a malformed RLE; ``.index`` is its position in ``rles`` and the message is
            :func:`cellmask.data.rle.rle_to_runs`'s.
    """
    rles = list(rles)
    parsed = _fast_parse(rles, height * width) if rles else None
    if parsed is not None:
        return (*parsed[:3], len(rles))
    # Not canonical text (empties, extra whitespace, ...) or invalid: one RLE at a time, with
    # :func:`rle_to_runs`'s exact checks naming the culprit.
    kept = [i for i, r in enumerate(rles) if not isinstance(r, str) or r.strip()]
    return _slow_parse([rles[i] for i in kept], kept, height, width)


def _fast_parse(rles: list[str], n_pixels: int | np.ndarray) -> tuple[np.ndarray, ...] | None:
    """Vectorised parse of canonical RLE text; ``None`` if anything is unusual or invalid.

    Args:
        rles: ``N`` RLE strings; n_pixels: ``H * W`` of their image(s), an int or int64 ``[N]``.

    Returns:
        ``(starts, lengths, owner, counts)``: int64 ``[R]`` runs with their RLE's index, and
        int64 ``[N]`` runs per RLE.
    """
    try:
        joined = " ".join(rles)
        values = np.fromstring(joined, dtype=np.int64, sep=" ")
    except (TypeError, ValueError, AttributeError):  # not str, unparsable, or no fromstring
        return None
    # Canonical text only: every token plain decimal digits (no sign, no leading zero), tokens
    # separated by single spaces, no empty RLE. numpy also accepts other whitespace, repeated
    # separators, signs and leading zeros; each of those breaks one of these two equalities
    # (every token's text is at least its value's digits, and n tokens need n - 1 separators).
    # Then RLE k has exactly ``rles[k].count(" ") + 1`` tokens.
    n_spaces = joined.count(" ")
    if values.size != n_spaces + 1:
        return None
    n_digits = np.searchsorted(_POW10, values, side="right") + (values == 0)
    if len(joined) != int(n_digits.sum()) + n_spaces:
        return None
    counts = np.fromiter(map(str.count, rles, repeat(" ")), dtype=np.int64, count=len(rles)) + 1
    if (counts % 2).any():
        return None
    counts //= 2
    starts, lengths = values[0::2] - 1, values[1::2].copy()  # contiguous: faster downstream
    owner = np.repeat(np.arange(len(rles), dtype=np.int64), counts)
    ends = starts + lengths
    limit = n_pixels if np.isscalar(n_pixels) else np.repeat(n_pixels, counts)
    bad = (starts < 0).any() or (lengths <= 0).any() or (ends > limit).any()
    if not bad and len(starts) > 1:
        bad = bool(((starts[1:] < ends[:-1]) & (owner[1:] == owner[:-1])).any())
    return None if bad else (starts, lengths, owner, counts)


_POW10 = 10 ** np.arange(19, dtype=np.int64)  # 1, 10, ..., 1e18: digits of v = #(10^k <= v)


def _slow_parse(items: list[str], kept: list[int], height: int, width: int) -> Runs:
    """One :func:`rle_to_runs` per RLE: exact error messages, any whitespace."""
    if not items:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, 0
    runs = []
    for k, rle in enumerate(items):
        try:
            runs.append(rle_to_runs(rle, height, width))
        except ValueError as exc:
            raise RLEError(kept[k], str(exc)) from None
    starts = np.concatenate([s for s, _ in runs])
    lengths = np.concatenate([n for _, n in runs])
    owner = np.repeat(np.arange(len(runs), dtype=np.int64), [len(s) for s, _ in runs])
    return starts, lengths, owner, len(runs)


# ----------------------------------------------------------------------------------------------
# IoU
# ----------------------------------------------------------------------------------------------


def iou_pairs_from_runs(
    truth_runs: Runs, pred_runs: Runs, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact mask IoU of the truth/prediction pairs that overlap at all, from parsed runs.

    Intersections are summed run against run: each truth run is compared with the prediction
    runs that can overlap it (a binary search over the prediction runs sorted by start), so the
    cost grows with the number of runs and of overlapping pairs, not with pixels or ``T x P``.
    Masks may overlap on either side. If the candidate run pairs explode (a huge prediction
    over many others), the pixel method (:func:`_intersections_by_pixels`) takes over; both are
    exact.

    Args:
        truth_runs, pred_runs: ``(starts, lengths, owner, n)`` as :func:`rles_to_runs` returns.
        height, width: the image size.

    Returns:
        ``(ti, pj, iou)``: int64 ``[K]`` truth and prediction indices (sorted by ``ti``, then
        ``pj``) and float64 ``[K]`` IoU > 0 of the ``K`` overlapping pairs; every other pair
        has IoU 0.
    """
    _, t_lengths, t_owner, n_t = truth_runs
    _, p_lengths, p_owner, n_p = pred_runs
    if n_t == 0 or n_p == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float64)
    pairs = _intersections_by_runs(truth_runs, pred_runs)
    if pairs is None:
        pairs = _intersections_by_pixels(truth_runs, pred_runs, height * width)
    ti, pj, inter = pairs
    area_t = np.bincount(t_owner, weights=t_lengths, minlength=n_t)
    area_p = np.bincount(p_owner, weights=p_lengths, minlength=n_p)
    # union >= max(area) >= 1: empty masks were dropped when parsing
    return ti, pj, inter / (area_t[ti] + area_p[pj] - inter)


def iou_from_runs(truth_runs: Runs, pred_runs: Runs, height: int, width: int) -> np.ndarray:
    """Exact mask IoU of every truth with every prediction, from parsed runs.

    Returns:
        float64 ``[T, P]``; ``iou[i, j]`` is the IoU of truth ``i`` and prediction ``j``.
    """
    ti, pj, values = iou_pairs_from_runs(truth_runs, pred_runs, height, width)
    iou = np.zeros((truth_runs[3], pred_runs[3]), dtype=np.float64)
    iou[ti, pj] = values
    return iou


def _sum_by_pair(pair: np.ndarray, amount: np.ndarray, n_p: int) -> tuple[np.ndarray, ...]:
    """Sum ``amount`` over equal ``pair = ti * n_p + pj`` keys: ``(ti, pj, total)`` int64."""
    if len(pair) == 0:  # no truth overlaps any prediction
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, amount[:0]
    order = np.argsort(pair, kind="stable")
    pair, amount = pair[order], amount[order]
    first = np.flatnonzero(np.concatenate([[True], pair[1:] != pair[:-1]]))
    keys = pair[first]
    return keys // n_p, keys % n_p, np.add.reduceat(amount, first)


def _intersections_by_runs(
    truth_runs: Runs, pred_runs: Runs, max_pairs_per_run: int = 64
) -> tuple[np.ndarray, ...] | None:
    """Intersection areas of overlapping pairs, ``(ti, pj, inter)`` int64 ``[K]``, from run
    overlaps; ``None`` if the candidate run pairs exceed ``max_pairs_per_run`` per run."""
    t_starts, t_lengths, t_owner, _ = truth_runs
    p_starts, p_lengths, p_owner, n_p = pred_runs
    order = np.argsort(p_starts, kind="stable")
    ps, pl, po = p_starts[order], p_lengths[order], p_owner[order]
    pe_max = np.maximum.accumulate(ps + pl)  # non-decreasing even where predictions overlap
    t_ends = t_starts + t_lengths
    # Prediction runs j that may overlap truth run [a, b): ps[j] < b and (max end up to j) > a.
    lo = np.searchsorted(pe_max, t_starts, side="right")
    hi = np.searchsorted(ps, t_ends, side="left")
    n_cand = np.maximum(hi - lo, 0)
    total = int(n_cand.sum())
    if total > max_pairs_per_run * (len(t_starts) + len(ps)):
        return None
    t_idx = np.repeat(np.arange(len(t_starts)), n_cand)
    p_idx = np.arange(total) + np.repeat(lo - (np.cumsum(n_cand) - n_cand), n_cand)
    overlap = np.minimum(t_ends[t_idx], ps[p_idx] + pl[p_idx]) - np.maximum(t_starts[t_idx], ps[p_idx])
    keep = overlap > 0  # candidates after an earlier, longer run may still miss
    return _sum_by_pair(t_owner[t_idx[keep]] * n_p + po[p_idx[keep]], overlap[keep], n_p)


def _intersections_by_pixels(truth_runs: Runs, pred_runs: Runs, n_pixels: int) -> tuple[np.ndarray, ...]:
    """Intersection areas of overlapping pairs, ``(ti, pj, inter)`` int64 ``[K]``: predictions
    painted into ``H * W`` label images (one per layer of overlap), truth pixels looked up in
    them. Cost grows with the pixels; used when run pairs explode."""
    t_starts, t_lengths, t_owner, _ = truth_runs
    p_starts, p_lengths, p_owner, n_p = pred_runs
    t_pix = runs_to_indices(t_starts, t_lengths)
    t_lab = np.repeat(t_owner, t_lengths)
    p_pix = runs_to_indices(p_starts, p_lengths)
    p_lab = np.repeat(p_owner, p_lengths) + 1  # 0 = no prediction
    label = np.zeros(n_pixels, dtype=np.int32)
    label[p_pix] = p_lab
    if np.count_nonzero(label) == len(p_pix):
        layers = [label]  # predictions do not overlap: one label image holds them all
    else:
        layers = _overlap_layers(p_pix, p_lab, n_pixels)
    pairs = []
    for layer in layers:
        hit = layer[t_pix]
        sel = np.flatnonzero(hit)
        pairs.append(t_lab[sel] * n_p + (hit[sel].astype(np.int64) - 1))
    pair = np.concatenate(pairs)
    return _sum_by_pair(pair, np.ones(len(pair), dtype=np.int64), n_p)


def _overlap_layers(pix: np.ndarray, lab: np.ndarray, n_pixels: int) -> list[np.ndarray]:
    """Split overlapping instances' pixels into label images in which nothing overlaps.

    The ``k``-th instance covering a pixel (in instance order) goes to layer ``k``.

    Args:
        pix: int64 ``[M]`` flat pixel indices; lab: int ``[M]`` labels (>= 1) of those pixels.

    Returns:
        int32 ``[H * W]`` label images, as many as the deepest overlap.
    """
    order = np.argsort(pix, kind="stable")
    pix, lab = pix[order], lab[order]
    new = np.concatenate([[True], pix[1:] != pix[:-1]])
    group_start = np.maximum.accumulate(np.where(new, np.arange(len(pix)), 0))
    depth = np.arange(len(pix)) - group_start
    layers = []
    for k in range(int(depth.max()) + 1):
        sel = depth == k
        layer = np.zeros(n_pixels, dtype=np.int32)
        layer[pix[sel]] = lab[sel]
        layers.append(layer)
    return layers


def iou_matrix(truth_rles: Sequence[str], pred_rles: Sequence[str], height: int, width: int) -> np.ndarray:
    """Exact mask IoU of every truth RLE with every predicted RLE of one image.

    Agrees with ``pycocotools.mask.iou`` on the same masks (the tests check it) but is much
    faster on whole submissions: RLE text parsed per image in one go, no per-mask Python
    object, no per-pair loop (see :func:`iou_pairs_from_runs`).

    Args:
        truth_rles: ``T`` row-major RLE strings; pred_rles: ``P`` of them. Empty strings are
            skipped (they are not instances), so ``T``/``P`` count the non-empty ones.
        height, width: the image size.

    Returns:
        float64 ``[T, P]`` IoU (``[0, P]``/``[T, 0]`` when a side is empty).

    Raises:
        RLEError: a malformed RLE (a ``ValueError``; ``.index`` says which of its list).
    """
    return iou_from_runs(
        rles_to_runs(truth_rles, height, width), rles_to_runs(pred_rles, height, width), height, width
    )


# ----------------------------------------------------------------------------------------------
# Precision per threshold
# ----------------------------------------------------------------------------------------------


def image_precision(iou: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """The competition's precision of one image at each threshold.

    Args:
        iou: float ``[T, P]`` truth x prediction IoU.
        thresholds: float ``[K]``; a pair matches at ``t`` when ``iou > t`` (strict).

    Returns:
        float64 ``[K]``: ``TP / (TP + FP + FN)``; 1 everywhere when ``T == P == 0``, 0 where the
        denominator is 0 otherwise (see the module docstring).
    """
    iou = np.asarray(iou, dtype=np.float64)
    ti, pj = np.nonzero(iou > np.min(thresholds))
    return precision_from_pairs(ti, pj, iou[ti, pj], iou.shape[0], iou.shape[1], thresholds)


def precision_from_pairs(
    ti: np.ndarray,
    pj: np.ndarray,
    iou: np.ndarray,
    n_truth: int,
    n_pred: int,
    thresholds: np.ndarray = THRESHOLDS,
) -> np.ndarray:
    """:func:`image_precision` from the sparse pairs (every pair not listed has IoU <= all
    thresholds, e.g. the overlapping pairs of :func:`iou_pairs_from_runs`).

    Args:
        ti, pj: int ``[K]`` truth and prediction indices; iou: float ``[K]`` their IoU.
        n_truth, n_pred: ``T`` and ``P``.

    Returns:
        float64 ``[len(thresholds)]``.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    n_k = len(thresholds)
    if n_truth == 0 and n_pred == 0:
        return np.ones(n_k, dtype=np.float64)
    match = np.asarray(iou)[None, :] > thresholds[:, None]  # [K thresholds, pairs]
    k_idx = np.broadcast_to(np.arange(n_k)[:, None], match.shape)[match]
    t_idx = np.broadcast_to(ti, match.shape)[match]
    p_idx = np.broadcast_to(pj, match.shape)[match]
    per_truth = np.bincount(k_idx * n_truth + t_idx, minlength=n_k * n_truth).reshape(n_k, n_truth)
    per_pred = np.bincount(k_idx * n_pred + p_idx, minlength=n_k * n_pred).reshape(n_k, n_pred)
    tp = (per_truth == 1).sum(axis=1)
    fn = (per_truth == 0).sum(axis=1)
    fp = (per_pred == 0).sum(axis=1)
    denom = tp + fp + fn
    return np.where(denom > 0, tp / np.maximum(denom, 1), 0.0).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Truth, report, scoring
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TruthImage:
    """The truth of one image.

    Attributes:
        height, width: image size in pixels.
        cell_type: ``shsy5y``/``cort``/``astro`` (or ``None`` if unknown).
        rles: the instances as row-major RLE strings (possibly none).
    """

    height: int
    width: int
    cell_type: str | None
    rles: list[str] = field(default_factory=list)


@dataclass
class ScoreReport:
    """The result of scoring a submission.

    Attributes:
        score: mean image score over all truth images.
        per_class: ``{cell_type: mean image score over truth images of that type}``; always has
            the keys ``shsy5y``, ``cort``, ``astro`` (value NaN when no image has that type),
            plus any other cell type met in the truth.
        per_threshold: ``{"0.50": mean precision at 0.50 over images, ..., "0.95": ...}``.
        n_images: number of truth images scored.
        per_image: ``{image_id: image score}`` in truth order.
        class_counts: ``{cell_type: number of images}``, same keys as ``per_class``.
        precision: float64 ``[n_images, 10]`` precision per image (rows in ``per_image`` order)
            and threshold.
    """

    score: float
    per_class: dict[str, float]
    per_threshold: dict[str, float]
    n_images: int
    per_image: dict[str, float]
    class_counts: dict[str, int]
    precision: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: ``score``, ``per_class`` (NaN -> ``None``), ``per_threshold``,
        ``n_images``, ``class_counts``."""

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "score": clean(self.score),
            "per_class": {k: clean(v) for k, v in self.per_class.items()},
            "per_threshold": {k: clean(v) for k, v in self.per_threshold.items()},
            "n_images": self.n_images,
            "class_counts": dict(self.class_counts),
        }


def _threshold_key(t: float) -> str:
    return f"{t:.2f}"


def _as_truth(truth: Mapping[str, TruthImage] | Iterable[Any]) -> dict[str, TruthImage]:
    """Accept ``{id: TruthImage}`` or records with ``image_id, height, width, cell_type`` and
    ``rles()`` (e.g. :class:`cellmask.data.records.ImageRecord`)."""
    if isinstance(truth, Mapping):
        return dict(truth)
    out: dict[str, TruthImage] = {}
    for rec in truth:
        rles = rec.rles() if callable(getattr(rec, "rles", None)) else list(rec.segmentations)
        out[rec.image_id] = TruthImage(rec.height, rec.width, rec.cell_type, list(rles))
    return out


def score_submission(
    truth: Mapping[str, TruthImage] | Iterable[Any],
    pred: Mapping[str, Sequence[str]],
) -> ScoreReport:
    """Score predictions against the truth with the competition metric.

    Args:
        truth: ``{image_id: TruthImage}`` (see :func:`read_truth_csv`) or an iterable of
            records with ``image_id``, ``height``, ``width``, ``cell_type`` and ``rles()``.
        pred: ``{image_id: [rle, ...]}`` as :func:`cellmask.submission.read_submission` gives.
            A truth image missing from ``pred`` is scored with no prediction.

    Returns:
        A :class:`ScoreReport`.

    Raises:
        DataError: ``pred`` names an image id that the truth lacks; an RLE is malformed (the
            message names the image id and the instance's index in its list); the truth is
            empty. Errors carry ``image_id``, ``index`` (or ``None``) and ``side``
            (``"truth"``/``"pred"``) attributes.
    """
    truth = _as_truth(truth)
    if not truth:
        raise _located_error("truth has no images", None, None, "truth")
    for image_id in pred:
        if image_id not in truth:
            raise _located_error(f"image id {image_id!r} is not in the truth", image_id, None, "pred")

    ids = list(truth)
    images = [truth[i] for i in ids]
    truth_runs, pred_runs = [], []
    for image_id, img in zip(ids, images, strict=True):
        for side, rles, out in (("truth", img.rles, truth_runs), ("pred", pred.get(image_id, ()), pred_runs)):
            try:
                out.append(rles_to_runs(rles, img.height, img.width))
            except RLEError as exc:
                what = "truth instance" if side == "truth" else "prediction"
                msg = f"image id {image_id!r}, {what} {exc.index} (row {exc.index + 1} of that id): {exc}"
                raise _located_error(msg, image_id, exc.index, side) from None
    sizes = [(img.height, img.width) for img in images]
    return _score_runs(ids, [img.cell_type for img in images], sizes, truth_runs, pred_runs)


def _score_runs(
    ids: list[str],
    cell_types: list[str | None],
    sizes: list[tuple[int, int]],
    truth_runs: list[Runs],
    pred_runs: list[Runs],
) -> ScoreReport:
    """The metric over parsed images (one entry per truth image in every list)."""
    precision = np.zeros((len(ids), len(THRESHOLDS)), dtype=np.float64)
    for row, (t_runs, p_runs, (height, width)) in enumerate(zip(truth_runs, pred_runs, sizes, strict=True)):
        ti, pj, iou = iou_pairs_from_runs(t_runs, p_runs, height, width)
        precision[row] = precision_from_pairs(ti, pj, iou, t_runs[3], p_runs[3])
    image_scores = precision.mean(axis=1)
    names = list(CLASSES) + sorted({c for c in cell_types if c is not None and c not in CLASSES})
    per_class, class_counts = {}, {}
    for name in names:
        sel = np.array([c == name for c in cell_types], dtype=bool)
        class_counts[name] = int(sel.sum())
        per_class[name] = float(image_scores[sel].mean()) if sel.any() else math.nan
    return ScoreReport(
        score=float(image_scores.mean()),
        per_class=per_class,
        per_threshold={
            _threshold_key(t): float(v) for t, v in zip(THRESHOLDS, precision.mean(axis=0), strict=True)
        },
        n_images=len(ids),
        per_image={i: float(s) for i, s in zip(ids, image_scores, strict=True)},
        class_counts=class_counts,
        precision=precision,
    )


def _located_error(message: str, image_id: str | None, index: int | None, side: str) -> DataError:
    err = DataError(message)
    err.image_id = image_id  # type: ignore[attr-defined]
    err.index = index  # type: ignore[attr-defined]
    err.side = side  # type: ignore[attr-defined]
    return err


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def read_truth_csv(path: str | Path) -> dict[str, TruthImage]:
    """Read a competition-style truth CSV (``train.csv``) into ``{image_id: TruthImage}``.

    Rows are grouped by ``id`` (first-appearance order); a row with an empty ``annotation``
    marks an image with no truth instance. Only ``id``, ``annotation``, ``width``, ``height``
    and the optional ``cell_type`` are read; RLEs are validated when scored. (For scoring
    files, :func:`score_files` has a faster reader; this one is the general, exact one.)

    Raises:
        FileNotFoundError: no such file.
        DataError: a missing column, a short row, an empty id, a non-integer or non-positive
            size, or a size or cell type that differs between rows of one id; the message
            names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such truth file")
    out: dict[str, TruthImage] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in TRUTH_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header: {header})")
        i_id, i_ann, i_w, i_h = (header.index(c) for c in TRUTH_COLUMNS)
        i_ct = header.index("cell_type") if "cell_type" in header else None
        need = max(i_id, i_ann, i_w, i_h, -1 if i_ct is None else i_ct) + 1
        for row in reader:
            if not row:
                continue
            where = f"{path}, line {reader.line_num}"
            if len(row) < need:
                raise DataError(f"{where}: {len(row)} field(s), the header has {len(header)}")
            image_id = row[i_id].strip()
            if not image_id:
                raise DataError(f"{where}: empty id")
            cell_type = (row[i_ct].strip() or None) if i_ct is not None else None
            img = out.get(image_id)
            if img is None:
                size = _parse_size(row[i_h], row[i_w], where, image_id)
                img = out[image_id] = TruthImage(size[0], size[1], cell_type, [])
            elif (row[i_h].strip(), row[i_w].strip(), cell_type) != (
                str(img.height),
                str(img.width),
                img.cell_type,
            ):
                raise DataError(
                    f"{where}: id {image_id!r}: height/width/cell_type {row[i_h]}/{row[i_w]}/{cell_type} "
                    f"differ from the id's first row ({img.height}/{img.width}/{img.cell_type})"
                )
            rle = row[i_ann].strip()
            if rle:
                img.rles.append(rle)
    return out


def _parse_size(height: str, width: str, where: str, image_id: str) -> tuple[int, int]:
    try:
        h, w = int(height), int(width)
    except ValueError:
        h = w = 0
    if h <= 0 or w <= 0:
        raise DataError(
            f"{where}: id {image_id!r}: height/width {height!r}/{width!r} are not positive integers"
        )
    return h, w


def _line_of(path: Path, image_id: str, predicate: Any = None) -> int | None:
    """Line number of the first row of ``image_id`` for which ``predicate(row)`` holds (any
    row when ``None``). Only used to word an error, so a second pass over the file is fine."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        i_id = [h.strip() for h in next(reader)].index("id")
        for row in reader:
            if len(row) > i_id and row[i_id].strip() == image_id and (predicate is None or predicate(row)):
                return reader.line_num
    return None


def _find_line(path: Path, column: str, image_id: str, index: int | None) -> int | None:
    """Line of the ``index``-th non-empty ``column`` value of ``image_id`` (its first row when
    ``index`` is None)."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        i_col = [h.strip() for h in next(csv.reader(f))].index(column)
    if index is None:
        return _line_of(path, image_id)
    seen = [-1]

    def is_it(row: list[str]) -> bool:
        if row[i_col].strip():
            seen[0] += 1
        return seen[0] == index

    return _line_of(path, image_id, is_it)


# ----------------------------------------------------------------------------------------------
# Files, fast path: a bytes-level scan of plain CSVs
# ----------------------------------------------------------------------------------------------


@dataclass
class _Scan:
    """A CSV of RLEs scanned in bulk (see :func:`_scan_csv`).

    Attributes:
        ids: image ids in first-appearance order.
        first: ``{column: [its value on the image's first row, per image]}`` for the extra
            columns asked for.
        consistent: whether every row of an image has the same values in the extra columns.
        starts, lengths: int64 ``[R]`` runs (0-indexed starts) of every instance of the file,
            instances grouped by image in ``ids`` order, in file order within an image.
        counts: int64 ``[N]`` runs per instance (in that order).
        n_inst: int64 ``[len(ids)]`` instances per image.
    """

    ids: list[str]
    first: dict[str, list[str]]
    consistent: bool
    starts: np.ndarray
    lengths: np.ndarray
    counts: np.ndarray
    n_inst: np.ndarray

    def runs(self, n_pixels: np.ndarray) -> list[Runs] | None:
        """Validated runs per image (``n_pixels``: int64 ``[len(ids)]`` = ``H * W``), or
        ``None`` if any RLE is invalid (the slow path then names it)."""
        starts, lengths, counts, n_inst = self.starts, self.lengths, self.counts, self.n_inst
        if len(starts) and (starts.min() < 0 or lengths.min() <= 0):
            return None
        ends = starts + lengths
        inst_end = np.cumsum(counts)  # run index after each instance
        run_cut = np.concatenate([[0], inst_end])[np.concatenate([[0], np.cumsum(n_inst)])]
        if (n_pixels == n_pixels[0]).all():
            too_far = len(ends) and ends.max() > n_pixels[0]
        else:
            too_far = (ends > np.repeat(n_pixels, np.diff(run_cut))).any()
        if too_far:
            return None
        # Runs must be sorted and disjoint within an instance (not across instances).
        gap = starts[1:] - ends[:-1]
        gap[inst_end[:-1] - 1] = 0
        if (gap < 0).any():
            return None
        inst_local = np.arange(len(counts)) - np.repeat(np.cumsum(n_inst) - n_inst, n_inst)
        owner = np.repeat(inst_local, counts)
        cut = run_cut.tolist()
        return [
            (starts[a:b], lengths[a:b], owner[a:b], n)
            for a, b, n in zip(cut[:-1], cut[1:], n_inst.tolist(), strict=True)
        ]


def _scan_csv(path: Path, value_col: str, extra_cols: Sequence[str] = ()) -> _Scan | None:
    """Parse a CSV of RLEs (``id``, ``value_col``, ...) in bulk, on its bytes, with numpy.

    The fast path of :func:`score_files`: no csv module, no Python object per row (only one
    ``bytes`` per RLE field), one ``fromstring`` for every number of the file. It only takes
    plain files -- ASCII, ``\\n`` or ``\\r\\n`` line ends, no quotes, no blank line, every
    row with the header's field count, ids without surrounding spaces, RLEs as digits separated
    by single spaces -- and returns ``None`` for anything else (the general path then reads the
    file, and names any error).
    """
    if not path.is_file():
        return None
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n")
    if not raw.isascii() or b'"' in raw or b"\r" in raw:
        return None
    if not raw.endswith(b"\n"):
        raw += b"\n"
    header = [h.strip() for h in raw[: raw.index(b"\n")].decode("ascii").split(",")]
    if any(c not in header for c in ("id", value_col, *extra_cols)):
        return None
    n_cols = len(header)
    data = np.frombuffer(raw, dtype=np.uint8)
    scratch = np.empty(len(data), dtype=bool)  # one buffer for the byte comparisons
    newlines = np.flatnonzero(np.equal(data, 10, out=scratch))
    line_start, line_end = newlines[:-1] + 1, newlines[1:]
    n_rows = len(line_end)
    if n_rows == 0 or (line_end == line_start).any():
        return None
    commas = np.flatnonzero(np.equal(data, 44, out=scratch))
    del scratch
    commas = commas[commas > newlines[0]]
    # Exactly n_cols - 1 commas on every line: as many in all, and the right count before each.
    if len(commas) != n_rows * (n_cols - 1):
        return None
    if n_cols > 1 and (np.searchsorted(commas, line_start) != np.arange(n_rows) * (n_cols - 1)).any():
        return None
    commas = commas.reshape(n_rows, n_cols - 1)
    field_start = np.concatenate([line_start[:, None], commas + 1], axis=1)
    field_end = np.concatenate([commas, line_end[:, None]], axis=1)

    def strings(name: str, rows: np.ndarray) -> list[str]:
        k = header.index(name)
        bounds = zip(field_start[rows, k].tolist(), field_end[rows, k].tolist(), strict=True)
        return [raw[a:b].decode("ascii") for a, b in bounds]

    # Image of each row: rows come in blocks of one id (usually one block per image); only the
    # first row of a block becomes a Python string.
    k = header.index("id")
    id_start, id_end = field_start[:, k], field_end[:, k]
    if (id_end == id_start).any():
        return None
    new_block = np.ones(n_rows, dtype=bool)
    new_block[1:] = ~_same_as_previous(data, id_start, id_end)
    block_row = np.flatnonzero(new_block)
    block_ids = strings("id", block_row)
    index = {image_id: i for i, image_id in enumerate(dict.fromkeys(block_ids))}
    if not all(k == k.strip() for k in index):
        return None
    block_image = np.array([index[i] for i in block_ids], dtype=np.int64)
    row_image = np.repeat(block_image, np.diff(np.append(block_row, n_rows)))
    first_row = block_row[np.unique(block_image, return_index=True)[1]]
    first, consistent = {}, True
    for name in extra_cols:
        k = header.index(name)
        first[name] = strings(name, first_row)
        consistent = consistent and _same_as_first(
            data, field_start[:, k], field_end[:, k], first_row[row_image]
        )

    # The numbers: every RLE field of the file joined by spaces and parsed in one go.
    k = header.index(value_col)
    fields = list(map(raw.__getitem__, map(slice, field_start[:, k].tolist(), field_end[:, k].tolist())))
    joined = b" ".join(fields)
    # Only digits and spaces; then a field's tokens are at most its spaces + 1, with equality
    # only for single spaces between tokens, so equal totals below mean canonical text.
    if joined.translate(None, b"0123456789 "):
        return None
    n_spaces = np.fromiter(map(bytes.count, fields, repeat(b" ")), dtype=np.int64, count=n_rows)
    tokens = np.where(field_end[:, k] > field_start[:, k], n_spaces + 1, 0)
    n_tokens = int(tokens.sum())
    if (tokens % 2).any():
        return None
    # (fromstring of blanks alone gives [0], hence the guard)
    values = np.fromstring(joined, dtype=np.int64, sep=" ") if n_tokens else np.zeros(0, np.int64)
    if values.size != n_tokens:
        return None

    # Instances = rows with an RLE; group them by image (stable), runs follow their instance.
    inst_row = np.flatnonzero(tokens)
    counts = tokens[inst_row] // 2
    inst_image = row_image[inst_row]
    starts, lengths = values[0::2] - 1, values[1::2].copy()  # contiguous: faster downstream
    if len(inst_image) > 1 and (inst_image[1:] < inst_image[:-1]).any():
        order = np.argsort(inst_image, kind="stable")
        first_run = np.cumsum(counts) - counts
        counts, inst_image = counts[order], inst_image[order]
        run_order = np.arange(int(counts.sum())) + np.repeat(
            first_run[order] - (np.cumsum(counts) - counts), counts
        )
        starts, lengths = starts[run_order], lengths[run_order]
    return _Scan(
        ids=list(index),
        first=first,
        consistent=consistent,
        starts=starts,
        lengths=lengths,
        counts=counts,
        n_inst=np.bincount(inst_image, minlength=len(index)),
    )


def _field_matrix(data: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray | None:
    """uint8 ``[n, L]``: the bytes of ``n`` fields ``data[start:end]`` that all have length
    ``L`` (ids usually do), or ``None`` when their lengths differ."""
    length = end - start
    if len(length) == 0 or (length != length[0]).any():
        return None
    return data[start[:, None] + np.arange(length[0])]


def _same_as_previous(data: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """bool ``[n - 1]``: whether field ``i + 1`` (``data[start:end]``) equals field ``i``."""
    matrix = _field_matrix(data, start, end)
    if matrix is not None:
        return (matrix[1:] == matrix[:-1]).all(axis=1)
    length = end - start
    same = length[1:] == length[:-1]
    rows = np.flatnonzero(same) + 1  # compare these rows' bytes with the previous row's
    n = length[rows]
    offset = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    equal = data[np.repeat(start[rows], n) + offset] == data[np.repeat(start[rows - 1], n) + offset]
    row_of_byte = np.repeat(np.arange(len(rows)), n)
    differs = np.bincount(row_of_byte[~equal], minlength=len(rows)) > 0
    same[rows - 1] = ~differs
    return same


def _same_as_first(data: np.ndarray, start: np.ndarray, end: np.ndarray, ref: np.ndarray) -> bool:
    """Whether every field ``data[start[i]:end[i]]`` equals the field of row ``ref[i]``."""
    matrix = _field_matrix(data, start, end)
    if matrix is not None:
        return bool((matrix == matrix[ref]).all())
    length = end - start
    if (length != length[ref]).any():
        return False
    offset = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    return bool(
        (data[np.repeat(start, length) + offset] == data[np.repeat(start[ref], length) + offset]).all()
    )


def _score_files_fast(truth_csv: Path, pred_csv: Path) -> ScoreReport | None:
    """:func:`score_files` on plain, valid files through :func:`_scan_csv`; ``None`` when
    anything is unusual or wrong (the general path then runs and reports it)."""
    truth = _scan_csv(truth_csv, "annotation", ("height", "width", "cell_type"))
    if truth is None or not truth.consistent:
        return None
    pred = _scan_csv(pred_csv, "predicted")
    if pred is None:
        return None
    try:
        heights = np.array(truth.first["height"], dtype=np.int64)
        widths = np.array(truth.first["width"], dtype=np.int64)
    except ValueError:
        return None
    if (heights <= 0).any() or (widths <= 0).any():
        return None
    truth_runs = truth.runs(heights * widths)
    where = {image_id: i for i, image_id in enumerate(truth.ids)}
    pred_image = [where.get(image_id) for image_id in pred.ids]
    if truth_runs is None or None in pred_image:
        return None
    pred_runs_found = pred.runs(heights[pred_image] * widths[pred_image])
    if pred_runs_found is None:
        return None
    empty = np.zeros(0, dtype=np.int64)
    pred_runs: list[Runs] = [(empty, empty, empty, 0)] * len(truth.ids)
    for i, runs in zip(pred_image, pred_runs_found, strict=True):
        pred_runs[i] = runs
    cell_types = [c.strip() or None for c in truth.first["cell_type"]]
    sizes = list(zip(heights.tolist(), widths.tolist(), strict=True))
    return _score_runs(truth.ids, cell_types, sizes, truth_runs, pred_runs)


def score_files(truth_csv: str | Path, pred_csv: str | Path) -> ScoreReport:
    """Score a ``submission.csv`` against a competition-style truth CSV.

    Plain, valid files (what Kaggle and :mod:`cellmask.submission` write) go through a
    bytes-level scan (:func:`_scan_csv`); anything else -- quoting, blank lines, odd
    whitespace, and every error -- through :func:`read_truth_csv`,
    :func:`cellmask.submission.read_submission` and :func:`score_submission`, which give the
    same report, or an error message naming the file, line and image id.

    Args:
        truth_csv: ``id,annotation,width,height[,cell_type,...]`` (the competition's
            ``train.csv`` format); an image whose only row has an empty annotation has no truth.
        pred_csv: ``id,predicted``; truth images it lacks are scored with no prediction.

    Returns:
        A :class:`ScoreReport`.

    Raises:
        FileNotFoundError: a file is missing.
        DataError: bad CSV, an image id unknown to the truth, or a malformed RLE; the message
            names the file, the line and the image id.
    """
    truth_csv, pred_csv = Path(truth_csv), Path(pred_csv)
    fast = _score_files_fast(truth_csv, pred_csv)
    if fast is not None:
        return fast
    from cellmask.submission import read_submission

    truth = read_truth_csv(truth_csv)
    if not truth:
        raise DataError(f"{truth_csv}: no rows")
    pred = read_submission(pred_csv)
    try:
        return score_submission(truth, pred)
    except DataError as exc:
        side = getattr(exc, "side", None)
        image_id = getattr(exc, "image_id", None)
        if side is None or image_id is None:
            raise
        path, column = (pred_csv, "predicted") if side == "pred" else (truth_csv, "annotation")
        line = _find_line(path, column, image_id, exc.index)
        where = f"{path}, line {line}" if line is not None else str(path)
        if exc.index is None:  # an unknown id
            raise DataError(f"{where}: image id {image_id!r} is not in the truth file {truth_csv}") from None
        raise DataError(f"{where}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# CLI and plot
# ----------------------------------------------------------------------------------------------


def format_report(report: ScoreReport) -> str:
    """A readable multi-line table of a :class:`ScoreReport`."""
    lines = [f"score      {report.score:.4f}   ({report.n_images} images)", "per class"]
    for name, value in report.per_class.items():
        shown = "   n/a" if math.isnan(value) else f"{value:.4f}"
        lines.append(f"  {name:<8} {shown}   ({report.class_counts[name]} images)")
    lines.append("per threshold")
    for key, value in report.per_threshold.items():
        lines.append(f"  {key:<8} {value:.4f}")
    return "\n".join(lines)


def cli_score(args: Any) -> int:
    """``cellmask score --truth TRAIN_CSV --pred SUBMISSION_CSV [--json]``.

    Prints :func:`format_report`'s table, or with ``--json`` one JSON object with keys
    ``score``, ``per_class`` (``shsy5y``, ``cort``, ``astro``; ``null`` for a class without
    images), ``per_threshold`` (``"0.50"`` ... ``"0.95"``), ``n_images`` and ``class_counts``.
    Returns the exit status (0).
    """
    report = score_files(args.truth, args.pred)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_report(report))
    return 0


def plot_per_threshold(report: ScoreReport, ax: Any = None, label: str | None = None) -> Any:
    """Plot mean precision against the IoU threshold (matplotlib is imported only here).

    Args:
        report: a :class:`ScoreReport`.
        ax: a matplotlib ``Axes`` to draw on; a new figure's when ``None``.
        label: legend label of the line (default: the score).

    Returns:
        The ``Axes``.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    xs = [float(k) for k in report.per_threshold]
    ax.plot(xs, list(report.per_threshold.values()), marker="o", label=label or f"score {report.score:.4f}")
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("precision TP/(TP+FP+FN)")
    ax.set_xticks(xs)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
