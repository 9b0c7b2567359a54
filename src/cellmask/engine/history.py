"""The run's logs: ``metrics.csv`` (one row per epoch) and its plot ``metrics.png``, and
``steps.csv`` (one row per iteration and rank).

Column names of an epoch row: ``epoch``; ``train_<key>`` for the epoch's mean of every value a
training step returned (``train_loss`` the total, ``train_loss_*`` its terms, any other
``train_*`` a logged statistic) and ``train_skipped_steps``; ``lr``; ``val_<key>`` for each
validation metric; ``time_s``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

NOT_PLOTTED = ("train_skipped_steps",)
"""Training columns left out of the plot (they stay in metrics.csv)."""


def write_metrics_csv(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One row per epoch; columns in first-seen order (a value an epoch lacks stays empty)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(history))
        writer.writeheader()
        writer.writerows(history)
    return path


def append_rows_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Append ``rows`` to the CSV at ``path`` (created if absent). A row with a column the file
    lacks makes the file be rewritten with the widened header (earlier rows leave it empty)."""
    path = Path(path)
    header = _header(path)
    if header is None or not set(_columns(rows)) <= set(header):
        old = read_rows_csv(path) if header is not None else []
        return write_metrics_csv([*old, *rows], path)
    with path.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=header).writerows(rows)
    return path


def read_rows_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file as dicts of strings (``[]`` when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def keep_epochs_csv(path: str | Path, last_epoch: int, before_iteration: int | None = None) -> None:
    """Drop the rows of a per-step or per-epoch CSV whose ``epoch`` is after ``last_epoch``
    (what a resumed run rewrites), except, with ``before_iteration``, the per-step rows of
    iterations before it (a run resumed inside an epoch keeps that epoch's steps done); nothing
    happens when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return
    rows = read_rows_csv(path)
    kept = [
        row
        for row in rows
        if int(row["epoch"]) <= last_epoch
        or (
            before_iteration is not None and row.get("iteration") and int(row["iteration"]) < before_iteration
        )
    ]
    if len(kept) != len(rows):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_header(path) or _columns(rows))
            writer.writeheader()
            writer.writerows(kept)


def plot_metrics(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Training losses, training statistics (non-loss values of the steps), validation metrics
    and the learning rate against the epoch, one panel each, as a PNG."""
    from matplotlib.figure import Figure

    path = Path(path)
    epochs = [row["epoch"] for row in history]
    panels = metric_panels(_columns(history))
    fig = Figure(figsize=(5 * max(len(panels), 1), 4), layout="constrained")
    first = None  # every panel spans the run's epochs, also one validated only at the end
    for i, (title, ks) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1, sharex=first)
        first = first or ax
        for k in ks:
            ax.plot(epochs, [row.get(k, float("nan")) for row in history], marker="o", ms=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title == "learning rate":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def metric_panels(columns: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``[(panel title, columns plotted in it), ...]`` of :func:`plot_metrics` (empty panels left out)."""
    keys = [k for k in columns if k not in NOT_PLOTTED]
    panels = [
        ("training losses", [k for k in keys if k.startswith("train_loss")]),
        (
            "training statistics",
            [k for k in keys if k.startswith("train_") and not k.startswith("train_loss")],
        ),
        ("validation", [k for k in keys if k.startswith("val_")]),
        ("learning rate", [k for k in keys if k == "lr"]),
    ]
    return [(title, ks) for title, ks in panels if ks]


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def _header(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        return next(csv.reader(f), None)
