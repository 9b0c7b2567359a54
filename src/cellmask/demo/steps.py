"""The steps of ``cellmask demo``, each a function of a :class:`DemoContext`.

:func:`cellmask.demo.core.run_demo` is the list of them: data (write a synthetic dataset, or
note what a root lacks), split, training, the scored table (thresholds tuned on the val fold
when a held-out fold exists), the real fixture images (synthetic source only), the test
submission. Each step prints a banner and records its wall time in ``ctx.times``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellmask.demo.plan import (
    ABLATION_LIVECELL,
    BASELINE,
    DATASETS,
    IMAGE_TYPE,
    QUICK_DATASET,
    QUICK_EPOCHS,
    Stage,
    demo_stages,
)
from cellmask.demo.source import DataSource
from cellmask.demo.training import StageResult, default_workers, train_stages

__all__ = [
    "TUNE_MASK_GRID",
    "TUNE_SCORE_GRID",
    "DemoContext",
    "Scored",
    "banner",
    "data_step",
    "existing_runs",
    "fixture_step",
    "precision_recall",
    "scored_step",
    "split_step",
    "stages_for",
    "submission_step",
    "train_step",
    "write_demo_data",
]

TUNE_SCORE_GRID: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(2, 19))
"""Score thresholds the demo tries (0.10-0.90): below 0.10 a minutes-old detector keeps
thousands of boxes per image, each segmented once per image while tuning."""
TUNE_MASK_GRID: tuple[float, ...] = (0.4, 0.5, 0.6)


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


@dataclass
class DemoContext:
    """What every step reads: where, with what, and the clock.

    Attributes:
        out: the run directory (one folder per trained model).
        source: the data (:class:`~cellmask.demo.source.DataSource`).
        profile: the config profile.
        stages: the runs to train; ``configs`` their resolved configs.
        device, progress, quick: as :func:`~cellmask.demo.core.run_demo`'s.
        times: seconds per step (filled as the steps run).
    """

    out: Path
    source: DataSource
    profile: str
    stages: list[Stage]
    configs: dict[str, dict[str, Any]]
    device: str = "cpu"
    progress: bool = False
    quick: bool = False
    times: dict[str, float] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.source.root

    @property
    def branch_stages(self) -> list[Stage]:
        from cellmask.demo.plan import BRANCHES

        return sorted((s for s in self.stages if s.role == "branch"), key=lambda s: BRANCHES.index(s.name))

    def timed(self, key: str, start: float) -> None:
        self.times[key] = time.perf_counter() - start


def stages_for(
    source: DataSource, branches: Sequence[str], livecell: bool, baseline: bool, classifier: bool = False
) -> list[Stage]:
    """The runs to train: Soft Teacher only with unlabeled images, the baseline and the
    image-type classifier on request."""
    branches = list(branches)
    if not source.unlabeled:
        branches = [b for b in branches if b != "soft_teacher_resnext101"]
    stages = demo_stages(branches, livecell=livecell)
    if baseline:
        stages.append(Stage(BASELINE, BASELINE, "baseline"))
    if classifier:
        stages.append(Stage(IMAGE_TYPE, IMAGE_TYPE, "classifier", label="image-type classifier"))
    return stages


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


def data_step(ctx: DemoContext, livecell: bool) -> None:
    """1. A synthetic source is written now; a root is read as it is (its notes printed)."""
    if not ctx.source.write:
        banner(f"1/5 the images of {ctx.data} (read as they are)")
        for note in ctx.source.notes:
            print(f"note: {note}")
        return
    spec = QUICK_DATASET if ctx.quick else DATASETS.get(ctx.profile, DATASETS["demo"])
    banner(f"1/5 synthetic dataset -> {ctx.data}")
    t = time.perf_counter()
    n_livecell = ABLATION_LIVECELL["smoke" if ctx.quick else ctx.profile] if livecell else None
    counts = write_demo_data(ctx.data, spec, livecell=n_livecell)
    ctx.timed("synth", t)
    print(
        f"wrote {counts['train']} annotated ({counts['instances']} instances), {counts['unlabeled']} unlabeled "
        f"and {counts['test']} test images of {spec['size'][0]}x{spec['size'][1]} in {ctx.times['synth']:.1f} s"
    )


def split_step(ctx: DemoContext) -> Any:
    """The competition images' :class:`~cellmask.data.folds.Split` by the first branch's config
    (every run of the demo trains on the same split)."""
    from cellmask.training.split import competition_split

    split = competition_split(ctx.configs[ctx.branch_stages[0].name], ctx.data)
    print(
        f"split (grouped by sample, stratified by cell type): {len(split.train)} train / "
        f"{len(split.val)} val"
        + (f" (threshold tuning) / {len(split.holdout)} held out (scored)" if split.holdout else "")
    )
    return split


def existing_runs(stages: Sequence[Stage], out: Path) -> dict[str, StageResult]:
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


def train_step(ctx: DemoContext, train: bool, workers: int | None, reuse: bool) -> dict[str, StageResult]:
    """2. Train every stage (two at a time by default), or find the runs already there."""
    from cellmask.predict.runs import model_name

    if not train:
        return existing_runs(ctx.stages, ctx.out)
    workers = default_workers() if workers is None else int(workers)
    banner(
        f"2/5 training {len(ctx.stages)} models (profile {ctx.profile}, {workers} at a time) -> {ctx.out}: "
        + ", ".join(model_name(ctx.configs[s.name]) for s in ctx.stages)
    )
    t = time.perf_counter()
    results = train_stages(
        ctx.stages, ctx.configs, ctx.data, ctx.out, workers=workers,
        epochs=QUICK_EPOCHS if ctx.quick else None, device=ctx.device, reuse=reuse, progress=ctx.progress,
    )  # fmt: skip
    ctx.timed("training", t)
    return results


def precision_recall(records: Sequence[Any], predictions: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per cell type (and all): cells, predictions, precision and recall at IoU 0.5."""
    from cellmask.evaluate.counts import match_counts

    return {
        k: {
            "images": c.images,
            "truths": c.truths,
            "predictions": c.predictions,
            "precision": c.precision,
            "recall": c.recall,
        }
        for k, c in match_counts(records, predictions, 0.5).items()
    }


@dataclass
class Scored:
    """What step 3 measured.

    Attributes:
        name: ``holdout`` (scored on the held-out fold) or ``val``.
        records: the scored images.
        result: :func:`~cellmask.evaluate.evaluate_predictor`'s result (every row).
        tuned: :func:`~cellmask.evaluate.tune.tune_predictor`'s result on the val fold, or ``None``.
        tuned_row: the row scored with the tuned thresholds, or ``None``.
        miou: the segmenter's mean mask IoU on the scored images' truth boxes.
        miou_per_type: the same per cell type.
        diagnosis: :func:`~cellmask.evaluate.diagnose.diagnose` on the scored images (a
            competition root's held-out fold), or ``None``.
    """

    name: str
    records: list[Any]
    result: Any
    tuned: Any = None
    tuned_row: Any = None
    miou: float = float("nan")
    miou_per_type: dict[str, float] = field(default_factory=dict)
    diagnosis: Any = None


def scored_step(ctx: DemoContext, predictor: Any, split: Any, baseline: bool) -> Scored:
    """3. Every row of the ablation (each branch + segmenter, the baseline, the ensemble
    variants) on the held-out fold, with thresholds tuned on the val fold as one more row; on the
    val fold without tuning when there is no held-out fold (the synthetic demo)."""
    from cellmask.demo.reports.tables import write_truth_csv
    from cellmask.evaluate import Row, evaluate_predictor
    from cellmask.evaluate.diagnose import ORACLE_ROW, diagnose
    from cellmask.evaluate.tune import tune_predictor
    from cellmask.models.segmenter import evaluate_segmenter
    from cellmask.paths import CompetitionLayout
    from cellmask.predict.runs import load_run_model, resolve_run

    scored = Scored("holdout" if split.holdout else "val", list(split.holdout or split.val), None)
    extra = []
    if split.holdout:
        banner(
            f"3/5 thresholds tuned on the {len(split.val)} val images, then every row on "
            f"{len(scored.records)} held-out images"
        )
        t = time.perf_counter()
        # the exact re-check of the best grid point is left out: the held-out fold scores it
        scored.tuned = tune_predictor(
            predictor, split.val, TUNE_SCORE_GRID, TUNE_MASK_GRID, out=ctx.out / "tune",
            verify=False, progress=ctx.progress,
        )  # fmt: skip
        ctx.timed("tune", t)
        scored.tuned_row = Row("ensemble + TTA, thresholds tuned on the val fold", options=scored.tuned.best)
        extra.append(scored.tuned_row)
        if predictor.options.get("type_classifier") and predictor.options["class_vote"]:
            extra.append(
                Row("ensemble + TTA, image type by the detectors' vote", options={"type_classifier": None})
            )
        extra.append(Row(f"ensemble + TTA, {ORACLE_ROW}", true_type=True))
    else:
        banner(
            f"3/5 the ensemble and each branch on {len(scored.records)} validation images (competition metric)"
        )
    t = time.perf_counter()
    base = None
    if baseline:
        spec = resolve_run(ctx.out / BASELINE)
        base = (spec.name, load_run_model(spec, "detector", ctx.device))
    scored.result = evaluate_predictor(
        predictor, scored.records, ctx.out / "evaluate", ablation=True, baseline=base, split=scored.name,
        progress=ctx.progress, extra_rows=extra,
    )  # fmt: skip
    truth_csv = write_truth_csv(
        CompetitionLayout(ctx.data).train_csv,
        [r.image_id for r in scored.records],
        ctx.out / f"{scored.name}_truth.csv",
    )
    scored.miou = evaluate_segmenter(predictor.segmenter, scored.records, predictor.device)["mIoU"]
    for kind in sorted({r.cell_type for r in scored.records}):
        typed = [r for r in scored.records if r.cell_type == kind]
        scored.miou_per_type[kind] = evaluate_segmenter(predictor.segmenter, typed, predictor.device)["mIoU"]
    if split.holdout:  # per cell type: boxes found before any threshold, and the type decision
        scored.diagnosis = diagnose(predictor, scored.records, progress=ctx.progress)
    ctx.timed("evaluate", t)
    print(f"(re-score: cellmask score --truth {truth_csv} --pred {scored.result.files['submission']})")
    return scored


def fixture_step(ctx: DemoContext, predictor: Any, real: str | Path | None) -> tuple[list[Any], Any]:
    """4. The real fixture images at native size, with a synthetic source only (a root's own
    held-out fold is its real figure, and the fixtures are among the competition's training
    images). Returns ``(records, result or None)``."""
    from cellmask.demo.real import real_records, score_real

    records = real_records(real) if ctx.source.synthetic else []
    if ctx.quick:
        records = records[:2]
    if not records:
        banner(
            "4/5 "
            + (
                "no real annotated images found (tests/fixtures/sartorius_real): skipped"
                if ctx.source.synthetic
                else "real fixtures skipped: the held-out fold above is the real figure"
            )
        )
        return [], None
    banner(
        f"4/5 the same models on {len(records)} real annotated images at {records[0].height}x{records[0].width}"
    )
    t = time.perf_counter()
    result = score_real(predictor, records, ctx.out / "real", progress=ctx.progress)
    ctx.timed("real", t)
    return records, result


def submission_step(ctx: DemoContext, predictor: Any, submission: str | Path) -> tuple[int, Any]:
    """5. The root's ``test/`` images -> ``submission`` (checked), with overlays. Returns
    ``(number of test images, predict_folder's result or None when there are none)``."""
    from cellmask.data.sartorius import list_images
    from cellmask.paths import CompetitionLayout
    from cellmask.predict import predict_folder

    test_dir = CompetitionLayout(ctx.data).test_dir
    banner(f"5/5 submission for {test_dir}")
    t = time.perf_counter()
    n_test = len(list_images(test_dir)) if test_dir.is_dir() else 0
    pred = None
    if n_test:
        pred = predict_folder(
            test_dir,
            predictor=predictor,
            out=submission,
            overlays=ctx.out / "overlays",
            progress=ctx.progress,
        )
        print(pred.summary())
    else:
        print(f"no images in {test_dir}: no submission written")
    ctx.timed("test", t)
    return n_test, pred
