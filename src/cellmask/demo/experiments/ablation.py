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
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
from cellmask.demo.reports.ablation import format_ablation_md
from cellmask.demo.reports.machine import machine_line

__all__ = ["run_ablation"]


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
    from cellmask.demo.reports.tables import clean_json, format_demo_table, table_rows
    from cellmask.demo.training import default_workers, train_stages
    from cellmask.evaluate import Row, evaluate_predictor, run_rows
    from cellmask.evaluate.report import plot_ablation
    from cellmask.predict import Predictor
    from cellmask.predict.runs import load_run_model, resolve_run
    from cellmask.training.split import load_split

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
