"""The report of a score: a readable table, the ``cellmask score`` command and a plot."""

from __future__ import annotations

import json
import math
from typing import Any

from cellmask.metric.files import score_files
from cellmask.metric.scoring import ScoreReport

__all__ = ["cli_score", "format_report", "plot_per_threshold"]


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
