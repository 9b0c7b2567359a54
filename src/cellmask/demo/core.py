"""``run_demo``: synthetic data -> every branch + the segmenter -> the ensemble, scored and
submitted (the steps are in :mod:`cellmask.demo`'s docstring)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cellmask.demo.plan import (
    ABLATION_LIVECELL,
    BRANCHES,
    DATASETS,
    QUICK_DATASET,
    QUICK_EPOCHS,
    Stage,
    default_config_dir,
    demo_stages,
)
from cellmask.demo.training import StageResult, default_workers, train_stages

__all__ = ["SUMMARY_KEYS", "load_stage_configs", "run_demo", "write_demo_data"]

log = logging.getLogger("cellmask.demo")

SUMMARY_KEYS = (
    "profile",
    "data",
    "n_train",
    "n_val",
    "n_test",
    "n_real",
    "synthetic",
    "branches",
    "segmenter",
    "segmenter_mIoU",
    "score",
    "score_per_class",
    "score_per_threshold",
    "best_branch",
    "best_branch_score",
    "ablation",
    "real_score",
    "real_per_class",
    "submission",
    "submission_ok",
    "figures",
    "time_s",
)
"""Keys of ``summary.json``."""


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def load_stage_configs(stages: Sequence[Stage], profile: str, config_dir: Path) -> dict[str, dict[str, Any]]:
    """``{stage name: resolved config}`` (the stage's file, ``profile``, its overrides)."""
    from cellmask.config import load_config

    return {
        s.name: load_config(
            config_dir / f"{s.config}.yaml", profile=profile, overrides=list(s.overrides) or None
        )
        for s in stages
    }


def write_demo_data(data: Path, spec: Mapping[str, Any], livecell: int | None = None) -> dict[str, int]:
    """``cellmask synth`` with the demo's counts (``livecell``: override the LIVECell count;
    the competition images do not depend on it)."""
    from cellmask.data.synthetic import write_dataset

    return write_dataset(
        data,
        n_train=spec["train"],
        n_unlabeled=spec["unlabeled"],
        n_test=spec["test"],
        n_livecell=spec["livecell"] if livecell is None else livecell,
        size=tuple(spec["size"]),
    )


def _existing_runs(stages: Sequence[Stage], out: Path) -> dict[str, StageResult]:
    """The runs of ``stages`` already in ``out`` (``--skip-train``); a missing checkpoint is one
    clear error naming it."""
    from cellmask.engine.history import read_rows_csv

    results = {}
    for s in stages:
        ckpt = out / s.name / "best.pt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt}: no such checkpoint (train first, or drop --skip-train)")
        results[s.name] = StageResult(
            s, out / s.name, 0.0, None, len(read_rows_csv(out / s.name / "metrics.csv")), True
        )
    return results


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
    profile: str = "demo",
    quick: bool = False,
    branches: Sequence[str] = BRANCHES,
    submission: str | Path = "submissions/submission.csv",
    device: str = "cpu",
    synth: bool = True,
    train: bool = True,
    workers: int | None = None,
    reuse: bool = False,
    real: str | Path | None = None,
    predict_config: str | Path | Mapping[str, Any] | None = None,
    config_dir: str | Path | None = None,
    progress: bool | None = None,
    livecell: bool = False,
) -> dict[str, Any]:
    """Run the demo (:mod:`cellmask.demo`); returns the summary (keys :data:`SUMMARY_KEYS`).

    Args:
        branches: the detector branches to train and ensemble (config names, default all four).
        workers: trainings at a time (default two on a machine with two or more cores).
        reuse: keep a trained run whose saved config equals the one it would be trained with.
        livecell: the paper's two stages, LIVECell pretraining first
            (:func:`~cellmask.demo.plan.demo_stages`); the dataset gets LIVECell images.
        real: a folder of real annotated images (``train.csv`` + ``train/``; default the source
            tree's ``tests/fixtures/sartorius_real``), scored at native size.
        predict_config: a predict YAML or mapping (default: the paper's values).
        progress: tqdm bars (``None``: when stderr is a terminal).

    Raises:
        FileNotFoundError: ``train=False`` and a checkpoint is missing (the message names it).
    """
    from cellmask.data.sartorius import list_images
    from cellmask.demo.real import real_records, score_real
    from cellmask.demo.report import (
        clean_json,
        format_demo_table,
        format_summary,
        one_per_class,
        save_comparison,
        table_rows,
        write_truth_csv,
    )
    from cellmask.evaluate import evaluate_predictor
    from cellmask.models.segmenter import evaluate_segmenter
    from cellmask.paths import CompetitionLayout
    from cellmask.predict import Predictor, predict_folder
    from cellmask.predict.runs import model_name
    from cellmask.train import load_split

    t_start = time.perf_counter()
    progress = sys.stderr.isatty() if progress is None else progress
    times: dict[str, float] = {}
    out, data = Path(out), Path(data)
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    layout = CompetitionLayout(data)
    stages = demo_stages(branches, livecell=livecell)
    configs = load_stage_configs(stages, profile, config_dir)
    branch_stages = sorted((s for s in stages if s.role == "branch"), key=lambda s: BRANCHES.index(s.name))
    first = configs[branch_stages[0].name]

    # 1. data
    if synth:
        spec = QUICK_DATASET if quick else DATASETS.get(profile, DATASETS["demo"])
        _banner(f"1/5 synthetic dataset -> {data}")
        t = time.perf_counter()
        n_livecell = ABLATION_LIVECELL["smoke" if quick else profile] if livecell else None
        counts = write_demo_data(data, spec, livecell=n_livecell)
        times["synth"] = time.perf_counter() - t
        print(
            f"wrote {counts['train']} annotated ({counts['instances']} instances), {counts['unlabeled']} unlabeled "
            f"and {counts['test']} test images of {spec['size'][0]}x{spec['size'][1]} in {times['synth']:.1f} s"
        )
    train_records, val_records, _ = load_split(first, data, "sartorius")

    # 2. training
    if train:
        workers = default_workers() if workers is None else int(workers)
        _banner(
            f"2/5 training {len(stages)} models (profile {profile}, {workers} at a time) -> {out}: "
            + ", ".join(model_name(configs[s.name]) for s in stages)
        )
        t = time.perf_counter()
        results = train_stages(
            stages,
            configs,
            data,
            out,
            workers=workers,
            epochs=QUICK_EPOCHS if quick else None,
            device=device,
            reuse=reuse,
            progress=progress,
        )
        times["training"] = time.perf_counter() - t
    else:
        results = _existing_runs(stages, out)
    seg_dir = out / "segmenter"
    predictor = Predictor.from_runs(
        [out / s.name for s in branch_stages], seg_dir, config=predict_config, device=device
    )

    # 3. the ensemble on the validation images: every branch alone vs the ensemble (ablation)
    _banner(f"3/5 the ensemble and each branch on {len(val_records)} validation images (competition metric)")
    t = time.perf_counter()
    val = evaluate_predictor(
        predictor, val_records, out / "evaluate", ablation=True, split="val", progress=progress
    )
    truth_csv = write_truth_csv(layout.train_csv, [r.image_id for r in val_records], out / "val_truth.csv")
    miou = evaluate_segmenter(predictor.segmenter, val_records, predictor.device)
    times["evaluate"] = time.perf_counter() - t
    print(f"(re-score: cellmask score --truth {truth_csv} --pred {val.files['submission']})")

    # 4. the real annotated images at native size
    records = real_records(real)
    if quick:
        records = records[:2]
    real_result = None
    if records:
        _banner(
            f"4/5 the same models on {len(records)} real annotated images at {records[0].height}x{records[0].width}"
        )
        t = time.perf_counter()
        real_result = score_real(predictor, records, out / "real", progress=progress)
        times["real"] = time.perf_counter() - t
    else:
        _banner("4/5 no real annotated images found (tests/fixtures/sartorius_real): skipped")

    # 5. the synthetic test images -> the submission
    _banner(f"5/5 submission for {layout.test_dir}")
    t = time.perf_counter()
    test_records = list_images(layout.test_dir)
    pred = predict_folder(
        layout.test_dir, predictor=predictor, out=submission, overlays=out / "overlays", progress=progress
    )
    print(pred.summary())
    times["test"] = time.perf_counter() - t

    main = next(r for r in val.rows if r.row.configured)
    figures = [out / s.name / "metrics.png" for s in stages]
    figures.append(
        save_comparison(
            out / "overlay_val.png", one_per_class(val_records), main.predictions, main.report.per_image
        )
    )
    if real_result is not None:
        real_main = next(r for r in real_result.rows if r.row.configured)
        figures.append(
            save_comparison(
                out / "overlay_real.png",
                one_per_class(records),
                real_main.predictions,
                real_main.report.per_image,
            )
        )
    figures += [
        p
        for k, p in val.files.items()
        if k in ("per_threshold", "ablation_per_class", "ablation_per_threshold")
    ]

    singles = [r for r in val.rows if r.row.branches is not None and len(r.row.branches) == 1]
    best_single = max(singles, key=lambda r: r.report.score) if singles else main
    rows = table_rows(val.rows, real_result.rows if real_result else ())
    table = format_demo_table(rows, len(val_records), len(records))
    times["total"] = time.perf_counter() - t_start
    summary = {
        "profile": profile + (" (quick)" if quick else ""),
        "data": str(data),
        "n_train": len(train_records),
        "n_val": len(val_records),
        "n_test": len(test_records),
        "n_real": len(records),
        "synthetic": synth,
        "branches": [
            {
                "name": model_name(configs[s.name]),
                "run": str(out / s.name),
                "seconds": round(results[s.name].seconds, 1),
                "epochs": results[s.name].epochs,
                "init": s.init,
                "box_AP50": _best_row(out / s.name, "val_AP50"),
            }
            for s in branch_stages
        ],
        "segmenter": model_name(configs["segmenter"]),
        "segmenter_mIoU": miou["mIoU"],
        "score": main.report.score,
        "score_per_class": main.report.per_class,
        "score_per_threshold": main.report.per_threshold,
        "best_branch": best_single.row.name,
        "best_branch_score": best_single.report.score,
        "ablation": rows,
        "real_score": real_main.report.score if real_result else math.nan,
        "real_per_class": real_main.report.per_class if real_result else {},
        "submission": str(pred.submission),
        "submission_ok": pred.ok,
        "submission_problems": pred.problems,
        "figures": [str(f) for f in figures if Path(f).is_file()],
        "time_s": {
            **{k: round(v, 1) for k, v in times.items() if k != "total"},
            **{
                f"train {s.name}": round(results[s.name].seconds, 1)
                for s in stages
                if not results[s.name].reused
            },
            "total": round(times["total"], 1),
        },
    }
    (out / "summary.json").write_text(json.dumps(clean_json(summary), indent=2) + "\n")
    print(format_summary(summary, table))
    return summary
