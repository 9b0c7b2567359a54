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

__all__ = ["Row", "RowResult", "ablation_rows", "run_rows"]


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
    """

    name: str
    branches: tuple[str, ...] | None = None
    tta: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    baseline: bool = False
    configured: bool = False


@dataclass
class RowResult:
    """A scored row: its settings, :class:`~cellmask.metric.ScoreReport` and instance count."""

    row: Row
    settings: dict[str, Any]
    report: Any
    instances: int
    predictions: dict[str, list[str]]


def _on(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(float(v) > 0 for v in value.values())
    return bool(value) and float(value) > 0


def settings_of(row: Row, options: Mapping[str, Any], n_branches: int) -> dict[str, Any]:
    """The table columns describing a row: branches, TTA, vote, min area, re-scoring."""
    opts = {**options, **row.options}
    return {
        "branches": "baseline"
        if row.baseline
        else (n_branches if row.branches is None else len(row.branches)),
        "tta": bool(row.tta and not row.baseline),
        "class_vote": bool(opts["class_vote"]),
        "min_area": _on(opts["min_area"]),
        "rescore": bool(opts["rescore"]),
    }


def ablation_rows(
    branch_names: Sequence[str], options: Mapping[str, Any], baseline: str | None = None
) -> list[Row]:
    """The ablation: each branch alone (+ segmenter, no TTA), the baseline (if given), the
    ensemble without and with TTA, with re-scoring, and the paper-exact variant beside the class
    vote and the minimum areas added one at a time.

    ``options`` are the configured ones; the row equal to them is marked ``configured``.
    """
    from cellmask.predict.postprocess import DEFAULT_MIN_AREA

    min_area = options["min_area"] if _on(options["min_area"]) else dict(DEFAULT_MIN_AREA)
    rows = [Row(f"{name} + segmenter", (name,), tta=False) for name in branch_names]
    if baseline is not None:
        rows.append(Row(f"{baseline} (own masks)", tta=False, baseline=True))
    if len(branch_names) > 1:
        rows.append(Row("ensemble, no TTA", tta=False))
    configured = Row("ensemble + TTA" if len(branch_names) > 1 else "branch + TTA", tta=True)
    rows.append(configured)
    rows.append(Row(f"{configured.name} + re-scoring", options={"rescore": True}))
    exact = {"class_vote": False, "min_area": 0, "rescore": False}
    rows.append(Row(f"{configured.name}, paper-exact (no vote, no min area)", options=exact))
    rows.append(Row(f"{configured.name} + class vote", options={**exact, "class_vote": True}))
    rows.append(Row(f"{configured.name} + min area", options={**exact, "min_area": min_area}))
    rows.append(
        Row(
            f"{configured.name} + class vote + min area",
            options={**exact, "class_vote": True, "min_area": min_area},
        )
    )
    # drop rows equal in effect to an earlier one, then mark the configured pipeline
    out: list[Row] = []
    seen: list[tuple] = []
    for row in rows:
        key = (row.branches, row.tta, row.baseline, _effective(options, row.options))
        if key in seen:
            continue
        seen.append(key)
        out.append(row)
    target = (None, bool(options["tta"]), False, _effective(options, {}))
    marked = []
    for row, key in zip(out, seen, strict=True):
        is_configured = key == target
        marked.append(Row(row.name, row.branches, row.tta, dict(row.options), row.baseline, is_configured))
    if not any(r.configured for r in marked):
        marked.append(Row("as configured", None, bool(options["tta"]), {}, False, True))
    return marked


def _effective(options: Mapping[str, Any], overrides: Mapping[str, Any]) -> str:
    import json

    merged = {**options, **overrides}
    return json.dumps(
        {k: merged[k] for k in ("class_vote", "min_area", "rescore", "score_thresholds")}, sort_keys=True
    )


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
    from cellmask.metric import score_submission
    from cellmask.predict.options import predict_config
    from cellmask.predict.pipeline import ProbabilityStore, finish_detections, own_masks
    from cellmask.predict.tta import VIEWS, Detections

    if any(r.baseline for r in rows) and baseline_model is None:
        raise ValueError("a baseline row needs the baseline model")
    views = VIEWS if any(r.tta and not r.baseline for r in rows) else VIEWS[:1]
    row_opts = [predict_config({**predictor.options, **r.options}) for r in rows]
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
