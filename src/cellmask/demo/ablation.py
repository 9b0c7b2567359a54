"""``make ablation`` (``cellmask demo --ablation``): paper Table 1's rows on the demo's models.

Beyond the demo's four branches and segmenter (reused when ``--reuse`` finds them trained with
today's configs), it trains

- the paper's baseline, Cascade Mask R-CNN ResNeXt-101 with its own mask head;
- the paper's LIVECell pretraining for branch 2 (Cascade R-CNN ResNeXt-101) and the segmenter:
  each trained on synthetic LIVECell images (eight cell types), then fine-tuned from those
  weights (``--init``) on the competition images exactly as the demo's runs are trained.

and scores on the synthetic validation images and the real fixture images (native size):
every row of :func:`cellmask.evaluate.ablation_rows` with the baseline, plus the LIVECell rows
(branch 2 pretrained alone; the ensemble with the pretrained segmenter; with both pretrained).
``benchmarks/ABLATION.md`` gets the table with the paper's own figures beside ours, the
command, the machine and the time; its figures go to ``benchmarks/ablation/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cellmask import CLASSES
from cellmask.demo.plan import (
    ABLATION_LIVECELL,
    BASELINE,
    BRANCHES,
    DATASETS,
    SOFT_TEACHER_INIT,
    ablation_stages,
    default_config_dir,
    demo_stages,
)

__all__ = ["PAPER", "format_ablation_md", "machine_line", "run_ablation"]

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


def machine_line() -> str:
    """The CPU's model name, cores, torch and Python versions (the reports' machine line)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def _relabel(results: Sequence[Any], names: Mapping[str, str]) -> list[Any]:
    """Row results with new names (``names``: old -> new) and none marked configured."""
    out = []
    for res in results:
        row = dataclasses.replace(res.row, name=names.get(res.row.name, res.row.name), configured=False)
        out.append(dataclasses.replace(res, row=row))
    return out


def run_ablation(
    out: str | Path = "runs/demo",
    data: str | Path = "data/demo",
    profile: str = "demo",
    md: str | Path = "benchmarks/ABLATION.md",
    device: str = "cpu",
    workers: int | None = None,
    reuse: bool = True,
    real: str | Path | None = None,
    quick: bool = False,
    command: str = "make ablation",
    config_dir: str | Path | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train what the ablation needs (the demo's runs reused), score every row, write ``md``.

    Returns:
        ``{"rows": [...], "md": path, "time_s": {...}}``.
    """
    from cellmask.demo.core import load_stage_configs, write_demo_data
    from cellmask.demo.plan import QUICK_DATASET, QUICK_EPOCHS
    from cellmask.demo.real import real_records, score_real
    from cellmask.demo.report import clean_json, format_demo_table, table_rows
    from cellmask.demo.training import default_workers, train_stages
    from cellmask.evaluate import Row, evaluate_predictor, run_rows
    from cellmask.evaluate.report import plot_ablation
    from cellmask.predict import Predictor
    from cellmask.predict.runs import load_run_model, resolve_run
    from cellmask.train import load_split

    start = time.perf_counter()
    progress = sys.stderr.isatty() if progress is None else progress
    out, data, md = Path(out), Path(data), Path(md)
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    times: dict[str, float] = {}

    spec = QUICK_DATASET if quick else DATASETS.get(profile, DATASETS["demo"])
    print(
        f"\n== ablation 1/4: synthetic dataset with {ABLATION_LIVECELL.get(profile, 8)} LIVECell images -> {data}"
    )
    t = time.perf_counter()
    write_demo_data(data, spec, livecell=ABLATION_LIVECELL.get(profile, 8))
    times["synth"] = time.perf_counter() - t

    stages = demo_stages() + ablation_stages()
    configs = load_stage_configs(stages, profile, config_dir)
    workers = default_workers() if workers is None else int(workers)
    print(f"\n== ablation 2/4: training {len(stages)} runs ({workers} at a time; trained demo runs reused)")
    t = time.perf_counter()
    results = train_stages(
        stages, configs, data, out, workers=workers, epochs=QUICK_EPOCHS if quick else None,
        device=device, reuse=reuse, progress=progress,
    )  # fmt: skip
    times["training"] = time.perf_counter() - t

    val_records = load_split(configs[BRANCHES[0]], data, "sartorius")[1]
    records = real_records(real)[: 2 if quick else None]
    branch_dirs = [out / b for b in BRANCHES]
    cache = out / "ablation" / "cache"
    base_spec = resolve_run(out / BASELINE)
    baseline = (base_spec.name, load_run_model(base_spec, "detector", device))

    print(f"\n== ablation 3/4: every row on {len(val_records)} validation and {len(records)} real images")
    t = time.perf_counter()
    scratch = Predictor.from_runs(branch_dirs, out / "segmenter", device=device, cache=cache)
    val = evaluate_predictor(scratch, val_records, out / "ablation" / "val", True, baseline, "val", progress)
    real_rows = (
        score_real(scratch, records, out / "ablation" / "real", True, baseline, progress=progress).rows
        if records
        else []
    )

    variants = {  # name of the ensemble row -> (branch runs, segmenter run)
        "ensemble + TTA, LIVECell-pretrained segmenter": (branch_dirs, out / "livecell_ft/segmenter"),
        "ensemble + TTA, LIVECell-pretrained branch 2 + segmenter": (
            [
                out / "livecell_ft/cascade_rcnn_resnext101" if b == SOFT_TEACHER_INIT else out / b
                for b in BRANCHES
            ],
            out / "livecell_ft/segmenter",
        ),
    }
    extra_val, extra_real = [], []
    for k, (name, (runs, seg)) in enumerate(variants.items()):
        pred = Predictor.from_runs(runs, seg, device=device, cache=cache)
        rows = [Row(name, tta=True)]
        labels = {name: name}
        if k == 1:  # the pretrained branch 2 alone, as the branches' own rows
            alone = next(b.name for b in pred.branches if b.run and "livecell_ft" in str(b.run.source))
            rows.insert(0, Row(f"{alone} + segmenter, both LIVECell-pretrained", (alone,), tta=False))
        extra_val += _relabel(run_rows(pred, val_records, rows, None, progress), labels)
        if records:
            extra_real += _relabel(score_real(pred, records, None, rows=rows, progress=progress), labels)
    times["evaluate"] = time.perf_counter() - t

    all_val = list(val.rows) + extra_val
    table = table_rows(all_val, list(real_rows) + extra_real)
    print("\n" + format_demo_table(table, len(val_records), len(records)))

    print(f"\n== ablation 4/4: {md}")
    fig_dir = md.parent / "ablation"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = plot_ablation(all_val, fig_dir)
    times["total"] = time.perf_counter() - start
    runs_info = {
        name: ("reused from the demo" if r.reused else f"{r.seconds:.0f} s")
        + f", {r.epochs} epochs"
        + (f", best {r.best['metric']} {r.best['value']:.3f}" if r.best else "")
        for name, r in results.items()
    }
    info = {
        "command": command,
        "profile": profile,
        "minutes": times["total"] / 60,
        "machine": machine_line(),
        "when": time.strftime("%Y-%m-%d"),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "n_val": len(val_records),
        "n_real": len(records),
        "runs": runs_info,
    }
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(format_ablation_md(table, info, figures, md.parent))
    summary = {
        "rows": table,
        "md": str(md),
        "figures": [str(p) for p in figures],
        "time_s": times,
        "info": info,
    }
    (out / "ablation" / "summary.json").write_text(
        json.dumps(clean_json(summary), indent=2, default=str) + "\n"
    )
    print(f"wrote {md} and {', '.join(str(p) for p in figures)} in {times['total'] / 60:.1f} min")
    return summary
