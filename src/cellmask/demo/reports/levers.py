"""``benchmarks/REAL_LEVERS.md`` (``make ablation-real``): one row per arm of each lever, the gain,
and a bar plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cellmask.data.classes import CLASSES


def run_line(run_dir: Path) -> str:
    """``3 epochs, 1111 s of training, best val_AP 0.067``: a run's ``metrics.csv`` in words
    (the seconds its epochs took, whether trained now or reused)."""
    from cellmask.engine.history import read_rows_csv

    rows = read_rows_csv(Path(run_dir) / "metrics.csv")
    seconds = sum(float(r.get("time_s") or 0) for r in rows)
    aps = [float(r["val_AP"]) for r in rows if r.get("val_AP")]
    return f"{len(rows)} epochs, {seconds:.0f} s of training" + (
        f", best val_AP {max(aps):.3f}" if aps else ""
    )


def format_levers_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a markdown table: lever, arm, run, score per class, and the lever's gain."""
    lines = [
        "| lever | arm | run | score | " + " | ".join(CLASSES) + " | gain |",
        "|---|---|---|---:|" + "---:|" * len(CLASSES) + "---:|",
    ]
    without: dict[str, float] = {}
    for r in rows:
        if r["arm"] == "without":
            without[r["lever"]] = r["score"]
        gain = f"{r['score'] - without[r['lever']]:+.3f}" if r["arm"] == "with" else ""
        lines.append(
            f"| {r['lever']} | {r['arm']} | {r['run']} | {r['score']:.3f} | "
            + " | ".join(f"{r[c]:.3f}" for c in CLASSES)
            + f" | {gain} |"
        )
    return "\n".join(lines)


def plot_levers(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One pair of bars per lever (without, with): the held-out score."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    levers = list(dict.fromkeys(r["lever"] for r in rows))
    fig = Figure(figsize=(8, 0.6 * len(levers) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, lever in enumerate(levers):
        arms = {r["arm"]: r["score"] for r in rows if r["lever"] == lever}
        ax.barh(k + 0.2, arms.get("without", 0.0), 0.4, color="0.7", label="without" if k == 0 else None)
        ax.barh(k - 0.2, arms.get("with", 0.0), 0.4, color="tab:blue", label="with" if k == 0 else None)
    ax.set_yticks(range(len(levers)), levers, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("competition metric, real held-out images")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def format_levers_md(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any], figure: Path) -> str:
    runs = "\n".join(f"- `{k}`: {v}" for k, v in info["runs"].items())
    return f"""# Levers on real cells

Made by `{info["command"]}` on {info["machine"]} ({info["when"]}; load average at the end
{info["load"]}; {info["minutes"]:.1f} min). Every arm is scored on the same
{info["n_holdout"]} held-out real images as `benchmarks/REAL.md` (no model and no threshold saw
them), with the segmenter of `{info["demo_runs"]}`. A training lever is one variant run of the
`cpu` profile beside the run of `{info["demo_runs"]}` it differs from in that one respect (single
branch + segmenter, no TTA); the last levers change only inference, on the four-branch ensemble
with TTA. `*` = the pipeline as configured.

{format_levers_table(rows)}

![levers]({figure})

The runs (the variants, then the `{info["demo_runs"]}` runs they are compared with):

{runs}
"""
