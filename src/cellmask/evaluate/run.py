"""``cellmask evaluate``: the competition metric of the ensemble on the validation split.

::

    cellmask evaluate --data ROOT --runs RUN [RUN ...] --segmenter RUN [--split val|all]
        [--ablation] [--baseline RUN] [--out DIR] [--device ...] [--cache DIR] [--config YAML] [--set ...]
        [--paper-exact]

The validation split is the one training used: :func:`cellmask.training.split.load_split` with the first
branch's config (``train.val_fraction``, ``train.seed``; grouped by sample); a warning names any
run whose config gives another split. ``--split all`` scores every annotated image (training
images included: an optimistic figure). Writes ``score.json``, ``val_submission.csv`` (+ its
``.predict.yaml``), ``score_per_threshold.png`` and, with ``--ablation``, ``ablation.md``,
``ablation.csv``, ``ablation_per_class.png`` and ``ablation_per_threshold.png`` (paper Table 1's
shape: :func:`~cellmask.evaluate.rows.ablation_rows`). ``--paper-exact`` scores the paper's
pipeline as the configured one (:func:`~cellmask.predict.options.load_predict_config`); the
ablation has a paper-exact row either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellmask.evaluate.rows import Row, RowResult, ablation_rows, run_rows

log = logging.getLogger("cellmask.evaluate")


@dataclass
class EvaluateResult:
    """What :func:`evaluate` measured.

    Attributes:
        report: the :class:`~cellmask.metric.ScoreReport` of the pipeline as configured
            (``.score``, ``.per_class``, ``.per_threshold``, ``.per_image``).
        rows: every scored variant (one without ``ablation``).
        n_images: images scored; split: ``"val"`` or ``"all"``.
        files: ``{"score", "submission", "config", "per_threshold", "ablation_md", ...}``.
        seconds: wall time.
    """

    report: Any
    rows: list[RowResult]
    n_images: int
    split: str
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """The one-screen text summary ``cellmask evaluate`` prints."""
        from cellmask.evaluate.report import format_ablation
        from cellmask.metric import format_report

        lines = [
            f"== cellmask evaluate: {self.n_images} images ({self.split} split), the pipeline as configured"
        ]
        lines.append(format_report(self.report))
        if len(self.rows) > 1:
            lines += ["", format_ablation(self.rows, self.n_images)]
        lines.append("")
        lines.append("files      " + ", ".join(str(p) for p in self.files.values()))
        lines.append(f"time       {self.seconds:.1f} s")
        return "\n".join(lines)


def load_eval_records(data: str | Path, configs: Sequence[Mapping[str, Any]], split: str = "val") -> list:
    """The images to score: the validation split of the first config (``"val"``) or every
    annotated image (``"all"``); warns when another config gives another validation split."""
    from cellmask.data.sartorius import read_train_csv
    from cellmask.paths import CompetitionLayout
    from cellmask.training.split import load_split

    if split not in ("val", "all"):
        raise ValueError(f"split must be 'val' or 'all', got {split!r}")
    if split == "all":
        log.warning("--split all scores the training images too: an optimistic figure")
        layout = CompetitionLayout(Path(data))
        return read_train_csv(layout.train_csv, layout.train_dir)
    val = load_split(dict(configs[0]), data, "sartorius")[1]
    ids = [r.image_id for r in val]
    for cfg in configs[1:]:
        other = [r.image_id for r in load_split(dict(cfg), data, "sartorius")[1]]
        if other != ids:
            log.warning(
                "a run's config gives another validation split (train.val_fraction/seed differ): "
                "scoring the first branch's (%d images)",
                len(ids),
            )
            break
    if not val:
        raise ValueError(f"{data}: the validation split is empty")
    return val


def evaluate_predictor(
    predictor: Any,
    records: Sequence[Any],
    out: str | Path | None = None,
    ablation: bool = False,
    baseline: tuple[str, Any] | None = None,
    split: str = "val",
    progress: bool = True,
    extra_rows: Sequence[Row] = (),
) -> EvaluateResult:
    """Score a built predictor on truth records (the work of :func:`evaluate`).

    Args:
        baseline: ``(name, Cascade Mask R-CNN model)`` for the ablation's baseline row.
        extra_rows: more variants scored in the same detection pass (e.g. tuned thresholds),
            after the ablation's rows (or the configured one).
    """
    from cellmask.config import save_config
    from cellmask.metric import plot_per_threshold
    from cellmask.predict.options import config_path_for
    from cellmask.submission import write_submission

    start = time.perf_counter()
    names = [b.name for b in predictor.branches]
    if ablation:
        rows = ablation_rows(names, predictor.options, baseline[0] if baseline else None)
    else:
        rows = [Row("as configured", None, bool(predictor.options["tta"]), {}, False, True)]
    rows = [*rows, *extra_rows]
    results = run_rows(predictor, records, rows, baseline[1] if baseline else None, progress)
    main = next(r for r in results if r.row.configured)
    files: dict[str, Path] = {}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        ids = [r.image_id for r in records]
        files["submission"] = write_submission(out / "val_submission.csv", main.predictions, image_ids=ids)
        files["config"] = save_config(predictor.resolved_config(), config_path_for(files["submission"]))
        payload = {**main.report.to_dict(), "split": split, "runs": predictor.describe_runs()}
        files["score"] = out / "score.json"
        files["score"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
        files["per_threshold"] = _plot_main(main, out / "score_per_threshold.png", plot_per_threshold)
        if ablation:
            from cellmask.evaluate.report import write_ablation

            files.update({f"ablation_{k}": v for k, v in write_ablation(results, out, len(records)).items()})
    return EvaluateResult(main.report, results, len(records), split, files, time.perf_counter() - start)


def _plot_main(main: RowResult, path: Path, plot: Any) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = plot(main.report, ax=fig.add_subplot(), label=f"{main.row.name}: {main.report.score:.3f}")
    ax.set_title(f"precision per IoU threshold, {main.report.n_images} images")
    fig.savefig(path, dpi=100)
    return path


def predictor_and_records(
    data: str | Path,
    runs: Sequence[str | Path],
    segmenter: str | Path,
    split: str = "val",
    **options: Any,
) -> tuple[Any, list]:
    """``(Predictor.from_runs(runs, segmenter, **options), the records of split)``: what
    ``evaluate`` and ``tune`` start from (``options``: ``config``, ``overrides``, ``device``,
    ``cache``, ``paper_exact``)."""
    from cellmask.predict.predictor import Predictor

    predictor = Predictor.from_runs(runs, segmenter, **options)
    configs = [b.run.config for b in predictor.branches if b.run is not None]
    return predictor, load_eval_records(data, configs, split)


def evaluate(
    data: str | Path,
    runs: Sequence[str | Path],
    segmenter: str | Path,
    split: str = "val",
    ablation: bool = False,
    out: str | Path | None = "runs/evaluate",
    *,
    baseline: str | Path | None = None,
    device: str | None = None,
    cache: str | Path | None = None,
    config: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    progress: bool = True,
    paper_exact: bool = False,
) -> EvaluateResult:
    """Score the ensemble on a Kaggle-layout root's validation split (and, with ``ablation``,
    every variant of paper Table 1).

    Args:
        data: the data root (``train.csv``, ``train/``).
        runs: detector run directories (branches); segmenter: the segmenter run.
        split: ``"val"`` (the split training held out) or ``"all"``.
        ablation: score every :func:`~cellmask.evaluate.rows.ablation_rows` variant.
        out: where the files go (``None``: write nothing).
        baseline: a Cascade Mask R-CNN run: the ablation's baseline row (its own masks).
        device, cache, config, overrides, paper_exact: as :meth:`Predictor.from_runs`
            (``paper_exact``: the paper's pipeline is the configured one, ``--paper-exact``).

    Returns:
        an :class:`EvaluateResult` (``.report.score``, ``.rows``, ``.summary()``).
    """
    from cellmask.engine import CheckpointError
    from cellmask.predict.runs import load_run_model, resolve_run

    options = {"config": config, "overrides": overrides, "device": device, "cache": cache}
    predictor, records = predictor_and_records(
        data, runs, segmenter, split, paper_exact=paper_exact, **options
    )
    base = None
    if baseline is not None:
        spec = resolve_run(baseline)
        if spec.kind != "cascade_mask_rcnn":
            raise CheckpointError(
                f"{baseline}: the baseline must be a cascade_mask_rcnn run, got {spec.kind}"
            )
        base = (spec.name, load_run_model(spec, "detector", predictor.device))
    return evaluate_predictor(predictor, records, out, ablation, base, split, progress)


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """The ``cellmask evaluate`` arguments."""
    from cellmask.predict.folder import add_common_arguments

    add_common_arguments(p, data=True)
    p.add_argument("--ablation", action="store_true", help="also score each branch alone and every variant")
    p.add_argument(
        "--baseline", default=None, metavar="RUN", help="Cascade Mask R-CNN run: the ablation's baseline row"
    )
    p.add_argument("--out", default="runs/evaluate", help="output folder (default runs/evaluate)")


def cli_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``cellmask evaluate``."""
    from cellmask.predict.folder import common_options

    result = evaluate(
        args.data,
        args.runs,
        args.segmenter,
        args.split,
        args.ablation,
        args.out,
        baseline=args.baseline,
        **common_options(args),
    )
    print(result.summary())
    return 0
