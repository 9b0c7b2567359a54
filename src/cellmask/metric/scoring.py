"""The competition's precision per image and threshold, and the score of a whole submission.

Per image, for every threshold ``t`` in :data:`THRESHOLDS`, a truth and a prediction *match*
when their mask IoU is strictly greater than ``t``; ``precision(t) = TP / (TP + FP + FN)``
(conventions in :mod:`cellmask.metric`). The image score is the mean over the thresholds and
the final score the mean over images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellmask.data.classes import CLASSES
from cellmask.errors import DataError
from cellmask.metric.iou import RLEError, Runs, iou_pairs_from_runs, rles_to_runs

__all__ = [
    "THRESHOLDS",
    "ScoreReport",
    "TruthImage",
    "image_precision",
    "precision_from_pairs",
    "score_runs",
    "score_submission",
]

THRESHOLDS: np.ndarray = np.arange(50, 100, 5) / 100
"""float64 ``[10]``: ``0.50, 0.55, ..., 0.95``, each the double nearest to its decimal (a
correctly rounded ``k / 100``; ``np.linspace(0.5, 0.95, 10)`` would give ``0.8999999999999999``
for 0.9). A match needs ``iou > t``, strictly."""


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
    thresholds, e.g. the overlapping pairs of :func:`~cellmask.metric.iou_pairs_from_runs`).

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
        truth: ``{image_id: TruthImage}`` (see :func:`~cellmask.metric.read_truth_csv`) or an iterable of
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
    return score_runs(ids, [img.cell_type for img in images], sizes, truth_runs, pred_runs)


def score_runs(
    ids: list[str],
    cell_types: list[str | None],
    sizes: list[tuple[int, int]],
    truth_runs: list[Runs],
    pred_runs: list[Runs],
) -> ScoreReport:
    """The metric over parsed images (one entry per truth image in every list).

    Args:
        ids: the truth image ids, in report order.
        cell_types: each image's cell type (``None`` if unknown).
        sizes: each image's ``(height, width)``.
        truth_runs, pred_runs: each image's ``(starts, lengths, owner, n)``, as
            :func:`~cellmask.metric.rles_to_runs` returns (``n == 0`` for no instance).

    Returns:
        A :class:`ScoreReport`.
    """
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
