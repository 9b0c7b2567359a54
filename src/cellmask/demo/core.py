"""``run_demo``: data (synthetic, or a competition root) -> every branch + the segmenter (+ the
baseline) -> the ensemble, scored and submitted: the steps of :mod:`cellmask.demo.steps` in
order, then the summary (the steps are in :mod:`cellmask.demo`'s docstring)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cellmask.demo.plan import BRANCHES, IMAGE_TYPE, Stage, default_config_dir
from cellmask.demo.steps import (
    DemoContext,
    Scored,
    data_step,
    fixture_step,
    precision_recall,
    scored_step,
    split_step,
    stages_for,
    submission_step,
    train_step,
    write_demo_data,
)
from cellmask.demo.training import StageResult

__all__ = ["SUMMARY_KEYS", "load_stage_configs", "run_demo", "write_demo_data"]

log = logging.getLogger("cellmask.demo")

SUMMARY_KEYS = (
    "profile",
    "data",
    "source",
    "notes",
    "split",
    "n_train",
    "n_val",
    "n_holdout",
    "n_scored",
    "n_test",
    "n_real",
    "synthetic",
    "branches",
    "runs",
    "segmenter",
    "segmenter_mIoU",
    "segmenter_mIoU_per_type",
    "diagnosis",
    "predict_config",
    "score",
    "score_per_class",
    "score_per_threshold",
    "best_branch",
    "best_branch_score",
    "baseline_score",
    "tuned",
    "precision_recall",
    "ablation",
    "real_score",
    "real_per_class",
    "submission",
    "submission_ok",
    "submission_problems",
    "figures",
    "time_s",
)
"""Keys of ``summary.json``."""


def load_stage_configs(
    stages: Sequence[Stage], profile: str, config_dir: Path, overrides: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """``{stage name: resolved config}`` (the stage's file, ``profile``, ``overrides`` for every
    stage (``--set``), then the stage's own)."""
    from cellmask.config import load_config

    return {
        s.name: load_config(
            config_dir / f"{s.config}.yaml", profile=profile, overrides=[*overrides, *s.overrides] or None
        )
        for s in stages
    }


def _best_row(run_dir: Path, column: str) -> float | None:
    """``column`` of the best epoch in a run's metrics.csv (its last row holding it when the
    run kept no best): e.g. the branch's validation box AP50 during training."""
    from cellmask.engine.history import read_rows_csv

    rows = [r for r in read_rows_csv(run_dir / "metrics.csv") if r.get(column)]
    if not rows:
        return None
    monitor = "val_AP" if "val_AP" in rows[-1] else column
    best = max(rows, key=lambda r: float(r.get(monitor) or "nan"))
    return float(best[column])


def run_demo(
    out: str | Path = "runs/demo",
    data: str | Path = "data/demo",
    profile: str | None = None,
    quick: bool = False,
    branches: Sequence[str] = BRANCHES,
    submission: str | Path = "submissions/submission.csv",
    device: str = "cpu",
    synth: bool | None = True,
    train: bool = True,
    workers: int | None = None,
    reuse: bool = False,
    real: str | Path | None = None,
    predict_config: str | Path | Mapping[str, Any] | None = None,
    config_dir: str | Path | None = None,
    progress: bool | None = None,
    livecell: bool = False,
    baseline: bool | None = None,
    report: str | Path | None = None,
    command: str | None = None,
    overrides: Sequence[str] = (),
    classifier: bool | None = None,
) -> dict[str, Any]:
    """Run the demo (:mod:`cellmask.demo`); returns the summary (keys :data:`SUMMARY_KEYS`).

    One flow for both data sources (:func:`~cellmask.demo.source.resolve_source`): a synthetic
    dataset written to ``data``, or a Kaggle-layout root read as it is (the real competition
    images). With a held-out fold (``train.holdout_fraction``, the ``cpu`` profile's 10%) the
    table is scored on it, and a row with thresholds tuned on the val fold joins the paper's;
    without one (the synthetic profiles) on the val fold.

    Args:
        profile: config profile (default ``cpu`` for a root, ``demo`` for synthetic data).
        synth: ``True`` write a synthetic dataset to ``data``; ``False`` read ``data`` as it
            is; ``None`` decide (:func:`~cellmask.demo.source.resolve_source`).
        branches: the detector branches to train and ensemble (config names, default all four;
            Soft Teacher only where the root has unlabeled images).
        workers: trainings at a time (default two on a machine with two or more cores).
        reuse: keep a trained run whose saved config equals the one it would be trained with.
        livecell: the paper's two stages, LIVECell pretraining first
            (:func:`~cellmask.demo.plan.demo_stages`); the dataset gets LIVECell images.
        real: a folder of real annotated images (``train.csv`` + ``train/``; default the source
            tree's ``tests/fixtures/sartorius_real``), scored at native size; only with a
            synthetic source (a root's own held-out fold is the real figure there).
        predict_config: a predict YAML or mapping (default: the paper's values).
        baseline: train and score the Cascade Mask R-CNN baseline too (default: with a root).
        classifier: train the image-type classifier (``configs/image_type.yaml``) and let it
            decide each image's type, so its thresholds and minimum area (default: with a root;
            the scored table keeps the detectors' vote beside it). The run's
            ``predict.yaml`` names it.
        report: write the markdown report there (``benchmarks/REAL.md`` for ``make demo-real``).
        command: the command line the report names.
        overrides: ``KEY.PATH=VALUE`` for every run's config (``--set``), e.g.
            ``train.max_hours=0.1`` (a wall-clock budget per run).
        progress: tqdm bars (``None``: when stderr is a terminal).

    Raises:
        FileNotFoundError: ``train=False`` and a checkpoint is missing (the message names it).
        DataError: a root to read without ``train.csv`` or ``train/`` (the message names them).
    """
    from cellmask.demo.source import resolve_source
    from cellmask.predict import Predictor

    t_start = time.perf_counter()
    source = resolve_source(data, synth, livecell)
    profile = profile or ("demo" if source.synthetic else "cpu")
    baseline = (not source.synthetic) if baseline is None else baseline
    classifier = (not source.synthetic) if classifier is None else classifier
    stages = stages_for(source, branches, livecell, baseline, classifier)
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    ctx = DemoContext(
        out=Path(out),
        source=source,
        profile=profile,
        stages=stages,
        configs=load_stage_configs(stages, profile, config_dir, overrides),
        device=device,
        progress=sys.stderr.isatty() if progress is None else progress,
        quick=quick,
    )
    data_step(ctx, livecell)
    split = split_step(ctx)
    results = train_step(ctx, train, workers, reuse)
    typed = [f"predict.type_classifier={(ctx.out / IMAGE_TYPE).resolve()}"] if classifier else None
    predictor = Predictor.from_runs(
        [ctx.out / s.name for s in ctx.branch_stages], ctx.out / "segmenter", config=predict_config,
        overrides=typed, device=device, cache=ctx.out / "evaluate" / "cache" if split.holdout else None,
    )  # fmt: skip
    write_predict_yaml(ctx.out, predictor)
    scored = scored_step(ctx, predictor, split, baseline)
    fixtures, fixture_result = fixture_step(ctx, predictor, real)
    n_test, pred = submission_step(ctx, predictor, submission)
    ctx.times["total"] = time.perf_counter() - t_start
    summary, table = build_summary(ctx, split, results, scored, fixtures, fixture_result, n_test, pred)
    from cellmask.demo.reports.tables import clean_json, format_summary

    (ctx.out / "summary.json").write_text(json.dumps(clean_json(summary), indent=2, default=str) + "\n")
    print(format_summary(summary, table))
    if report is not None:
        from cellmask.demo.reports.real import write_real_report

        path = write_real_report(report, summary, ctx.out, command=command or "cellmask demo")
        print(f"report     {path}")
    return summary


def write_predict_yaml(out: Path, predictor: Any) -> Path:
    """``<out>/predict.yaml``: the configured row's predict config, the image-type classifier (if
    any) named relative to it, so ``cellmask predict --runs <out>/<branch> ... --segmenter
    <out>/segmenter --config <out>/predict.yaml`` on any folder of images runs that pipeline."""
    from cellmask.predict.options import save_predict_config

    opts = dict(predictor.options)
    if opts.get("type_classifier"):
        opts["type_classifier"] = str(Path(opts["type_classifier"]).relative_to(out.resolve()))
    return save_predict_config(opts, out / "predict.yaml", predictor.describe_runs())


def _figures(ctx: DemoContext, scored: Scored, fixtures: Sequence[Any], fixture_result: Any) -> list[Path]:
    """Training curves, truth-vs-prediction overlays (one image per cell type), the ablation plots."""
    from cellmask.demo.reports.tables import one_per_class, save_comparison

    main = next(r for r in scored.result.rows if r.row.configured)
    figures = [ctx.out / s.name / "metrics.png" for s in ctx.stages]
    figures.append(
        save_comparison(
            ctx.out / f"overlay_{scored.name}.png",
            one_per_class(scored.records),
            main.predictions,
            main.report.per_image,
        )
    )
    if fixture_result is not None:
        fixture_main = next(r for r in fixture_result.rows if r.row.configured)
        figures.append(
            save_comparison(
                ctx.out / "overlay_real.png",
                one_per_class(fixtures),
                fixture_main.predictions,
                fixture_main.report.per_image,
            )
        )
    figures += [
        p
        for k, p in scored.result.files.items()
        if k in ("per_threshold", "ablation_per_class", "ablation_per_threshold")
    ]
    return [f for f in figures if Path(f).is_file()]


def build_summary(
    ctx: DemoContext,
    split: Any,
    results: Mapping[str, StageResult],
    scored: Scored,
    fixtures: Sequence[Any],
    fixture_result: Any,
    n_test: int,
    pred: Any,
) -> tuple[dict[str, Any], str]:
    """``(summary.json's content (keys SUMMARY_KEYS; NaN where a figure is missing), the printed
    table)``."""
    from cellmask.demo.reports.tables import format_demo_table, table_rows
    from cellmask.predict.runs import model_name

    rows_all = scored.result.rows
    main = next(r for r in rows_all if r.row.configured)
    singles = [r for r in rows_all if r.row.branches is not None and len(r.row.branches) == 1]
    best_single = max(singles, key=lambda r: r.report.score) if singles else main
    base_row = next((r for r in rows_all if r.row.baseline), None)
    fixture_main = next(r for r in fixture_result.rows if r.row.configured) if fixture_result else None
    rows = table_rows(rows_all, fixture_result.rows if fixture_result else ())
    label = "holdout" if split.holdout else "synthetic val" if ctx.source.synthetic else "val"
    table = format_demo_table(rows, len(scored.records), len(fixtures), label)
    tuned = scored.tuned
    summary = {
        "profile": ctx.profile + (" (quick)" if ctx.quick else ""),
        "data": str(ctx.data),
        "source": ctx.source.kind,
        "notes": list(ctx.source.notes),
        "split": scored.name,
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_holdout": len(split.holdout),
        "n_scored": len(scored.records),
        "n_test": n_test,
        "n_real": len(fixtures),
        "synthetic": ctx.source.synthetic,
        "branches": [
            {
                "name": model_name(ctx.configs[s.name]),
                "run": str(ctx.out / s.name),
                "seconds": round(results[s.name].seconds, 1),
                "epochs": results[s.name].epochs,
                "init": s.init,
                "box_AP50": _best_row(ctx.out / s.name, "val_AP50"),
            }
            for s in ctx.branch_stages
        ],
        "runs": {
            s.name: {
                "seconds": round(results[s.name].seconds, 1),
                "epochs": results[s.name].epochs,
                "reused": results[s.name].reused,
                "best": results[s.name].best,
            }
            for s in ctx.stages
        },
        "segmenter": model_name(ctx.configs["segmenter"]),
        "segmenter_mIoU": scored.miou,
        "segmenter_mIoU_per_type": scored.miou_per_type,
        "diagnosis": scored.diagnosis.to_json() if scored.diagnosis is not None else None,
        "predict_config": str(ctx.out / "predict.yaml"),
        "score": main.report.score,
        "score_per_class": main.report.per_class,
        "score_per_threshold": main.report.per_threshold,
        "best_branch": best_single.row.name,
        "best_branch_score": best_single.report.score,
        "baseline_score": base_row.report.score if base_row else math.nan,
        "tuned": None
        if tuned is None
        else {"thresholds": tuned.best, "val_score": tuned.score, "val_default": tuned.default_score},
        "precision_recall": {
            r.row.name: precision_recall(scored.records, r.predictions)
            for r in rows_all
            if r.row.configured or r.row.baseline or r.row == scored.tuned_row
        },
        "ablation": rows,
        "real_score": fixture_main.report.score if fixture_main else math.nan,
        "real_per_class": fixture_main.report.per_class if fixture_main else {},
        "submission": str(pred.submission) if pred else None,
        "submission_ok": pred.ok if pred else True,
        "submission_problems": pred.problems if pred else [],
        "figures": [str(f) for f in _figures(ctx, scored, fixtures, fixture_result)],
        "time_s": {
            **{k: round(v, 1) for k, v in ctx.times.items() if k != "total"},
            **{
                f"train {s.name}": round(results[s.name].seconds, 1)
                for s in ctx.stages
                if not results[s.name].reused
            },
            "total": round(ctx.times["total"], 1),
        },
    }
    return summary, table
