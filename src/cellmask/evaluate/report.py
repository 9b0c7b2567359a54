"""The ablation table and its figures: ``ablation.md``, ``ablation.csv``, two PNGs."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellmask.data.classes import CLASSES

__all__ = ["ablation_records", "format_ablation", "plot_ablation", "write_ablation"]


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "-"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def ablation_records(results: Sequence[Any]) -> list[dict[str, Any]]:
    """One flat dict per :class:`~cellmask.evaluate.rows.RowResult`: name, settings, the score
    overall, per class and per IoU threshold, the instance count."""
    out = []
    for res in results:
        rec: dict[str, Any] = {"row": res.row.name, **res.settings, "score": res.report.score}
        rec.update({name: res.report.per_class.get(name, math.nan) for name in CLASSES})
        rec.update({f"P@{k}": v for k, v in res.report.per_threshold.items()})
        rec["instances"] = res.instances
        rec["configured"] = res.row.configured
        out.append(rec)
    return out


def format_ablation(results: Sequence[Any], n_images: int) -> str:
    """A Markdown table (paper Table 1's shape) with the best score in bold."""
    recs = ablation_records(results)
    cols = ["row", "branches", "tta", "tta_fusion", "class_vote", "min_area", "rescore", "paper_exact"]
    cols += ["score", *CLASSES]
    cols += ["P@0.50", "P@0.75", "P@0.90", "instances"]
    best = max((r["score"] for r in recs), default=math.nan)
    lines = [
        f"Competition metric on {n_images} validation images (P@t: precision at IoU threshold t; "
        "* = the pipeline as configured; tta fusion: views = every (branch, view) one WBF entry, "
        "per_model = each branch's views merged first; paper exact: the paper's pipeline, "
        "`--paper-exact`).",
        "",
        "| " + " | ".join(c.replace("_", " ") for c in cols) + " |",
        "|" + "|".join("---" if c == "row" else "---:" for c in cols) + "|",
    ]
    for rec in recs:
        cells = []
        for c in cols:
            text = _fmt(rec[c])
            if c == "row" and rec["configured"]:
                text += " *"
            if c == "score" and rec["score"] == best:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _row_colours(n: int) -> list:
    """``n`` distinct colours: tab10's, or tab20's past ten rows (the ablation has up to 14), so
    that no two legend entries share a colour."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_ablation(results: Sequence[Any], out_dir: Path) -> list[Path]:
    """``ablation_per_class.png`` (grouped bars: rows x classes + overall) and
    ``ablation_per_threshold.png`` (precision vs IoU threshold, one line per row); one colour
    per row, the legends beside the axes (not over the bars and lines)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cellmask.metric import plot_per_threshold

    colours = _row_colours(len(results))
    groups = [*CLASSES, "overall"]
    fig = Figure(figsize=(max(7, 1.6 * len(groups) + 0.4 * len(results)) + 3, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(results))
    x = np.arange(len(groups))
    for k, res in enumerate(results):
        values = [res.report.per_class.get(c, math.nan) for c in CLASSES] + [res.report.score]
        offset = (k - (len(results) - 1) / 2) * width
        ax.bar(x + offset, np.nan_to_num(values), width, label=res.row.name, color=colours[k])
    ax.set_xticks(x, groups)
    ax.set_ylabel("competition score")
    ax.set_title("ablation: score per class")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    per_class = out_dir / "ablation_per_class.png"
    fig.savefig(per_class, dpi=100)

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_prop_cycle(color=colours)
    for res in results:
        plot_per_threshold(res.report, ax=ax, label=f"{res.row.name}: {res.report.score:.3f}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("ablation: precision per IoU threshold")
    per_threshold = out_dir / "ablation_per_threshold.png"
    fig.savefig(per_threshold, dpi=100)
    return [per_class, per_threshold]


def write_ablation(results: Sequence[Any], out_dir: str | Path, n_images: int) -> dict[str, Path]:
    """Write ``ablation.md``, ``ablation.csv`` and the two figures; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recs = ablation_records(results)
    csv_path = out_dir / "ablation.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(recs[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(recs)
    figures = plot_ablation(results, out_dir)
    md_path = out_dir / "ablation.md"
    md_path.write_text(
        "# Ablation\n\n"
        + format_ablation(results, n_images)
        + "\n\n"
        + "\n".join(f"![{p.stem}]({p.name})" for p in figures)
        + "\n"
    )
    return {"md": md_path, "csv": csv_path, "per_class": figures[0], "per_threshold": figures[1]}


def write_tune_files(result: Any, predictor: Any, out: Path) -> dict[str, Path]:
    """Write what :func:`cellmask.evaluate.tune.tune_predictor` found under ``out``:
    ``tuned.predict.yaml`` (the predictor's options with the tuned values), ``tune.json`` and the
    per-class curves ``tune.png``; returns ``{"config", "json", "plot"}`` paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cellmask.predict.options import save_predict_config

    out.mkdir(parents=True, exist_ok=True)
    tuned_opts = {**predictor.options, **result.best}
    files = {"config": save_predict_config(tuned_opts, out / "tuned.predict.yaml", predictor.describe_runs())}
    summary = {
        "best": result.best,
        "configured": result.configured,
        "score": result.score,
        "default_score": result.default_score,
        "gain": result.gain,
        "search_score": result.search_score,
        "search_default": result.search_default,
        "curves": {str(m): c for m, c in result.curves.items()},
    }
    files["json"] = out / "tune.json"
    files["json"].write_text(json.dumps(summary, indent=2) + "\n")
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(CLASSES), sharey=True)
    m = result.best["mask_threshold"]
    for ax, c in zip(axes, CLASSES, strict=True):
        for mask_thr, curves in result.curves.items():
            if c in curves:
                xs, ys = zip(*curves[c], strict=True)
                ax.plot(xs, ys, lw=2 if mask_thr == m else 1, label=f"mask {mask_thr}")
        ax.axvline(result.configured["score_thresholds"][c], color="gray", ls="--", lw=1)
        ax.axvline(result.best["score_thresholds"][c], color="red", lw=1)
        ax.set_title(
            f"{c}: {result.configured['score_thresholds'][c]} -> {result.best['score_thresholds'][c]}"
        )
        ax.set_xlabel("score threshold")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score (grid search)")
    axes[-1].legend(fontsize=7)
    files["plot"] = out / "tune.png"
    fig.savefig(files["plot"], dpi=100)
    return files
