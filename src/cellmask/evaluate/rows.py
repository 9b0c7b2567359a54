"""Pipeline variants scored side by side (paper Table 1's shape) from one detection pass.

A :class:`Row` is one variant: which branches, TTA or not, which ``predict`` options, or the
Cascade Mask R-CNN baseline with its own masks. :func:`run_rows` detects every image once with
every branch and both TTA views (from the detection cache when there is one), then fuses and
finishes each row from those detections; segmenter probabilities of a box are computed once
per image and shared by the rows (:class:`~cellmask.predict.pipeline.ProbabilityStore`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["PAPER_EXACT_ROW", "Row", "RowResult", "ablation_rows", "run_rows", "settings_of"]


@dataclass(frozen=True)
class Row:
    """One pipeline variant.

    Attributes:
        name: table label.
        branches: branch names fused (``None``: every branch).
        tta: fuse the flipped views too.
        options: ``predict`` overrides on top of the predictor's options.
        baseline: the Cascade Mask R-CNN baseline with its own masks (``branches`` unused).
        configured: this row is the pipeline as configured (what ``cellmask predict`` runs).
        true_type: every box of an image gets the image's true cell type (so its thresholds
            and minimum area), the class vote off: the oracle of
            :mod:`cellmask.evaluate.diagnose`, a diagnosis that uses the truth.
    """

    name: str
    branches: tuple[str, ...] | None = None
    tta: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    baseline: bool = False
    configured: bool = False
    true_type: bool = False


@dataclass
class RowResult:
    """A scored row: its settings, :class:`~cellmask.metric.ScoreReport` and instance count."""

    row: Row
    settings: dict[str, Any]
    report: Any
    instances: int
    predictions: dict[str, list[str]]


VIEWS_ROW = ", every view its own WBF entry"
PER_MODEL_ROW = " fused per model"
"""Suffixes of the row with the TTA reading not configured (``predict.tta_fusion``): 8 WBF entries
for 4 branches, or each branch's views merged first (:mod:`cellmask.predict.fusion`)."""

PAPER_EXACT_ROW = "paper-exact (5.3.2)"
"""The ablation's name for the paper's pipeline (after ``"ensemble + TTA, "``): the options of
``--paper-exact`` (:data:`~cellmask.predict.options.PAPER_EXACT`) on every branch with flip TTA."""


def _on(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(float(v) > 0 for v in value.values())
    return value is not None and bool(value) and float(value) > 0


def _fused(row: Row, n_branches: int) -> int:
    """How many branches a row fuses (0 for the baseline)."""
    if row.baseline:
        return 0
    return n_branches if row.branches is None else len(row.branches)


def settings_of(row: Row, options: Mapping[str, Any], n_branches: int) -> dict[str, Any]:
    """The table columns describing a row: branches, TTA and how its views were fused (``"-"``
    where that changes nothing: no TTA, or one branch), vote, min area, re-scoring, and whether
    it is the paper's pipeline (every branch, flip TTA, the options of ``--paper-exact``)."""
    from cellmask.predict.options import is_paper_exact

    opts = {**options, **row.options}
    tta = bool(row.tta and not row.baseline)
    return {
        "branches": "baseline" if row.baseline else _fused(row, n_branches),
        "tta": tta,
        "tta_fusion": opts["tta_fusion"] if tta and _fused(row, n_branches) > 1 else "-",
        "class_vote": bool(opts["class_vote"]),
        "min_area": _on(opts["min_area"]),
        "rescore": bool(opts["rescore"]),
        "paper_exact": bool(tta and row.branches is None and is_paper_exact(opts)),
    }


def ablation_rows(
    branch_names: Sequence[str], options: Mapping[str, Any], baseline: str | None = None
) -> list[Row]:
    """The ablation: each branch alone (+ segmenter, no TTA), the baseline (if given), the
    ensemble without TTA, with TTA (``"ensemble + TTA"``: the configured reading of how the views
    enter WBF) and the other reading beside it (:data:`VIEWS_ROW`: every (branch, view) one WBF
    entry; :data:`PER_MODEL_ROW`: each branch's views merged first, :mod:`cellmask.predict.fusion`),
    with re-scoring, and the paper's pipeline
    (:data:`PAPER_EXACT_ROW`: ``--paper-exact``'s options) beside the class vote and the minimum
    areas added to it one at a time.

    ``options`` are the configured ones; the row equal to them is marked ``configured``. Rows
    equal in effect to an earlier one are dropped (the paper-exact row keeps its name wherever it
    falls: under ``--paper-exact`` it is the configured row).
    """
    from cellmask.predict.options import PAPER_EXACT
    from cellmask.predict.postprocess import DEFAULT_MIN_AREA

    min_area = options["min_area"] if _on(options["min_area"]) else dict(DEFAULT_MIN_AREA)
    n = len(branch_names)
    rows = [Row(f"{name} + segmenter", (name,), tta=False) for name in branch_names]
    if baseline is not None:
        rows.append(Row(f"{baseline} (own masks)", tta=False, baseline=True))
    if n > 1:
        rows.append(Row("ensemble, no TTA", tta=False))
    head = "ensemble + TTA" if n > 1 else "branch + TTA"
    rows.append(Row(head, tta=True))  # the configured reading of the views (predict.tta_fusion)
    if n > 1:  # the other reading beside it
        other = "views" if options["tta_fusion"] == "per_model" else "per_model"
        name = VIEWS_ROW if other == "views" else PER_MODEL_ROW
        rows.append(Row(f"{head}{name}", options={"tta_fusion": other}))
    rows.append(Row(f"{head} + re-scoring", options={"rescore": True}))
    exact = dict(PAPER_EXACT)
    exact_name = f"{head}, {PAPER_EXACT_ROW}"
    rows.append(Row(exact_name, options=exact))
    rows.append(Row("paper-exact + class vote", options={**exact, "class_vote": True}))
    rows.append(Row("paper-exact + min area", options={**exact, "min_area": min_area}))
    rows.append(
        Row(
            "paper-exact + class vote + min area", options={**exact, "class_vote": True, "min_area": min_area}
        )
    )
    out: list[Row] = []
    keys: list[tuple] = []
    for row in rows:
        key = (
            row.branches,
            row.tta,
            row.baseline,
            _effective({**options, **row.options}, _fused(row, n) if row.tta else 0),
        )
        if key in keys:
            if row.name == exact_name:
                out[keys.index(key)] = row
            continue
        keys.append(key)
        out.append(row)
    target = (None, bool(options["tta"]), False, _effective(options, n if options["tta"] else 0))
    marked = [
        Row(row.name, row.branches, row.tta, dict(row.options), row.baseline, key == target, row.true_type)
        for row, key in zip(out, keys, strict=True)
    ]
    if not any(r.configured for r in marked):
        marked.append(Row("as configured", None, bool(options["tta"]), {}, False, True))
    return marked


_NO_EFFECT = ("tta", "batch_size", "device", "amp")
"""Options that change no row's result: ``tta`` (each row says its own), the execution ones."""


def _effective(opts: Mapping[str, Any], fused: int) -> str:
    """What in ``opts`` can change a row's result, as a comparable string: ``tta_fusion`` only
    where TTA views of several branches are fused, the vote's settings only with the vote on,
    per-class values with one number expanded to every class."""
    import json

    from cellmask.data.classes import CLASSES

    out = {k: v for k, v in opts.items() if k not in _NO_EFFECT}
    if fused < 2:
        out.pop("tta_fusion", None)
    if not out.get("class_vote"):
        out.pop("vote_before_wbf", None)
        out.pop("vote_min_score", None)
    for key in ("score_thresholds", "min_area"):
        value = out.get(key)
        if value is not None and not isinstance(value, Mapping):
            out[key] = dict.fromkeys(CLASSES, float(value))
        elif isinstance(value, Mapping):
            out[key] = {c: float(v) for c, v in value.items()}
    return json.dumps(out, sort_keys=True, default=str)


def run_rows(
    predictor: Any,
    records: Sequence[Any],
    rows: Sequence[Row],
    baseline_model: torch.nn.Module | None = None,
    progress: bool = True,
) -> list[RowResult]:
    """Predict ``records`` with every row and score each with the competition metric.

    Args:
        predictor: a :class:`~cellmask.predict.predictor.Predictor` (its branches, segmenter,
            options, cache).
        records: truth records (``image_id``, ``path``, size, ``cell_type``, ``rles()``).
        rows: the variants (:func:`ablation_rows`, or one row).
        baseline_model: the Cascade Mask R-CNN for ``baseline`` rows.

    Returns:
        one :class:`RowResult` per row, in order.
    """
    from cellmask.data.classes import CLASS_TO_LABEL
    from cellmask.metric import score_submission
    from cellmask.predict.options import predict_config
    from cellmask.predict.pipeline import ProbabilityStore, finish_detections, own_masks
    from cellmask.predict.tta import VIEWS, Detections

    if any(r.baseline for r in rows) and baseline_model is None:
        raise ValueError("a baseline row needs the baseline model")
    views = VIEWS if any(r.tta and not r.baseline for r in rows) else VIEWS[:1]
    row_opts = [
        predict_config({**predictor.options, **r.options, **({"class_vote": False} if r.true_type else {})})
        for r in rows
    ]
    preds: list[dict[str, list[str]]] = [{} for _ in rows]
    counts = [0] * len(rows)
    store = ProbabilityStore()
    for record, array, tensor, raw in predictor.iter_records(records, progress, "evaluate", views):
        size = tuple(array.shape)
        store.clear()
        base_out = None
        for k, (row, opts) in enumerate(zip(rows, row_opts, strict=True)):
            if row.baseline:  # one forward, no TTA: the baseline as the paper ran it
                if base_out is None:
                    with torch.no_grad():
                        base_out = baseline_model.eval()([tensor])[0]
                dets = Detections(
                    base_out["boxes"].float().cpu().numpy(),
                    base_out["scores"].float().cpu().numpy(),
                    base_out["labels"].cpu().numpy(),
                )
                inst = finish_detections(dets, size, opts, own_masks(base_out["masks"], size))
            else:
                dets = predictor.fuse(raw, size, row.branches, row.tta, opts)
                if row.true_type:  # the oracle: the truth picks each box's thresholds
                    dets = Detections(
                        dets.boxes, dets.scores, np.full(len(dets), CLASS_TO_LABEL[record.cell_type])
                    )
                inst = predictor.finish(tensor, dets, opts, store)
            preds[k][record.image_id] = predictor.rles(inst)
            counts[k] += len(inst)
    n_branches = len(predictor.branches)
    return [
        RowResult(row, settings_of(row, predictor.options, n_branches), score_submission(records, p), n, p)
        for row, p, n in zip(rows, preds, counts, strict=True)
    ]


def precision_at(report: Any, threshold: float) -> float:
    """Mean precision of a report at one IoU threshold (``nan`` if absent)."""
    return float(report.per_threshold.get(f"{threshold:.2f}", np.nan))
