"""``benchmarks/ABLATION.md`` (``make ablation``): paper Table 1's rows on the demo's models beside
the paper's own figures."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cellmask.data.classes import CLASSES

PAPER: dict[str, float] = {"baseline": 30.6, "single_low": 30.6, "single_high": 31.9, "ensemble": 33.2}
"""MDE-CellMask's own results (Kaggle metric x 100, the paper's Table 1 as summarised in the
project's design notes): the Cascade Mask R-CNN baseline, the range of the single detectors
with the segmenter, the ensemble. Per-class figures are not given there."""


def _paper_figure(row: Mapping[str, Any]) -> str:
    if row["baseline"]:
        return f"{PAPER['baseline']:.1f}"
    if row["branches"] == 1 and "LIVECell" not in row["row"]:
        return f"{PAPER['single_low']:.1f}-{PAPER['single_high']:.1f}"
    if row["row"].startswith("ensemble + TTA") and row["configured"]:
        return f"{PAPER['ensemble']:.1f}"
    return ""


def _num(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def format_ablation_md(
    rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any], figures: Sequence[Path], md_dir: Path
) -> str:
    """``benchmarks/ABLATION.md``: the table (synthetic validation per class, real images, the
    paper's figure), how it was made, the figures."""
    head = ["row", "synthetic val", *CLASSES, f"real ({info['n_real']} images)", "paper (x100)"]
    lines = [
        "# Ablation: paper Table 1's rows on the demo's models",
        "",
        f"Made by `{info['command']}` in {info['minutes']:.1f} min on {info['machine']} "
        f"({info['when']}; load average {info['load']}). Every model is trained from scratch on "
        f"synthetic data in the `{info['profile']}` profile (the same architectures at reduced width and depth, "
        "minutes of CPU; no ImageNet weights offline), so the absolute figures are far below the "
        "paper's: what carries over is the comparison between rows, measured on "
        f"{info['n_val']} synthetic validation images and on the {info['n_real']} real annotated "
        "images of `tests/fixtures/sartorius_real` at their native 520x704.",
        "",
        "Competition metric (mean over IoU thresholds 0.50-0.95 of TP / (TP + FP + FN)). "
        "`*` = the pipeline as configured (paper values + class vote + minimum areas). "
        "The paper's column: MDE-CellMask's own Kaggle scores x 100 "
        f"(baseline {PAPER['baseline']}, single detectors {PAPER['single_low']}-{PAPER['single_high']}, "
        f"ensemble {PAPER['ensemble']}); the paper gives no per-class figures.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "|".join("---:" for _ in head[1:]) + "|",
    ]
    best = max(r["score"] for r in rows)
    for r in rows:
        name = r["row"] + (" *" if r["configured"] else "")
        score = _num(r["score"])
        cells = [name, f"**{score}**" if r["score"] == best else score]
        cells += [_num(r[c]) for c in CLASSES]
        cells += [_num(r["real"]), _paper_figure(r)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Training (wall time of each run; runs train two at a time, one thread each):", ""]
    lines += [f"- {name}: {desc}" for name, desc in info["runs"].items()]
    lines += [""]
    lines += [f"![{p.stem}]({p.relative_to(md_dir).as_posix()})" for p in figures]
    return "\n".join(lines) + "\n"
