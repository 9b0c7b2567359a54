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

Where things are:

- :mod:`cellmask.metric.iou`: RLE text -> runs of a whole image, exact IoU from runs;
- :mod:`cellmask.metric.scoring`: precision per image and threshold, :class:`ScoreReport`,
  :func:`score_submission`;
- :mod:`cellmask.metric.files`: the truth CSV reader, :func:`score_files`, locating a bad row;
- :mod:`cellmask.metric.scan`: the bytes-level scan of plain CSVs (the fast path of
  :func:`score_files`);
- :mod:`cellmask.metric.report`: the table, ``cellmask score`` (:func:`cli_score`), the plot.
"""

from cellmask.metric.files import TRUTH_COLUMNS, read_truth_csv, score_files
from cellmask.metric.iou import (
    RLEError,
    Runs,
    iou_from_runs,
    iou_matrix,
    iou_pairs_from_runs,
    rles_to_runs,
)
from cellmask.metric.report import cli_score, format_report, plot_per_threshold
from cellmask.metric.scoring import (
    THRESHOLDS,
    ScoreReport,
    TruthImage,
    image_precision,
    precision_from_pairs,
    score_submission,
)

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
