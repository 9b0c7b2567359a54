"""Where a score is lost: cells missed against false cells, per cell type, at one IoU threshold.

The competition metric folds misses (FN) and false cells (FP) into one figure per threshold
(``TP / (TP + FP + FN)``). :func:`match_counts` keeps them apart, with the metric's own matching
(a truth and a prediction match when their mask IoU is strictly above ``t``; a truth is a TP when
exactly one prediction matches it), so a reader sees whether a pipeline misses cells (low
recall) or invents them (low precision).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MatchCounts", "match_counts"]


@dataclass(frozen=True)
class MatchCounts:
    """Instance counts of one cell type at one IoU threshold."""

    images: int
    truths: int
    predictions: int
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        """``TP / (TP + FP)``: the share of predicted cells that are real ones (nan: none)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        """``TP / (TP + FN)``: the share of real cells found exactly once (nan: none)."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")


def match_counts(
    records: Sequence[Any], predictions: Mapping[str, Sequence[str]], threshold: float = 0.5
) -> dict[str, MatchCounts]:
    """TP / FP / FN per cell type (and ``"all"``) of predicted RLEs against truth records.

    Args:
        records: truth records (``image_id``, ``height``, ``width``, ``cell_type``, ``rles()``).
        predictions: ``{image_id: [RLE, ...]}`` (an image absent: no prediction).
        threshold: the IoU a match must exceed.

    Returns:
        ``{cell type: MatchCounts}`` in first-seen order, then ``"all"``.
    """
    from cellmask.metric import iou_matrix

    sums: dict[str, np.ndarray] = {}
    for record in records:
        truth = [r for r in record.rles() if r]
        pred = [r for r in predictions.get(record.image_id, ()) if r]
        iou = iou_matrix(truth, pred, record.height, record.width) if truth and pred else None
        if iou is None:
            tp, fp, fn = 0, len(pred), len(truth)
        else:
            match = iou > threshold
            per_truth = match.sum(axis=1)
            tp = int((per_truth == 1).sum())
            fn = int((per_truth == 0).sum())
            fp = int((match.sum(axis=0) == 0).sum())
        row = np.array([1, len(truth), len(pred), tp, fp, fn])
        for key in (str(record.cell_type), "all"):
            sums[key] = sums.get(key, np.zeros(6, dtype=np.int64)) + row
    order = [k for k in sums if k != "all"] + (["all"] if "all" in sums else [])
    return {k: MatchCounts(*(int(v) for v in sums[k])) for k in order}
