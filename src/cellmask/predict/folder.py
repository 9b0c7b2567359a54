"""``cellmask predict``: a folder of images -> ``submission.csv`` (checked) + its resolved config.

::

    cellmask predict --images DIR --runs RUN [RUN ...] --segmenter RUN --out submission.csv \\
        [--device cpu|cuda] [--overlays DIR] [--cache DIR] [--config predict.yaml] [--set predict.x=y]
        [--paper-exact]

writes ``submission.csv`` (one row per instance, an empty row for an image without any),
``submission.predict.yaml`` beside it (the resolved ``predict`` section and the runs used:
``--config`` reads it back; ``paper_exact`` there says whether it was the paper's pipeline),
validates the submission against the folder (:func:`~cellmask.submission.check_submission`) and
prints a one-screen summary.

``--paper-exact`` (``predict``, ``evaluate`` and ``tune``) runs the paper's pipeline, section
5.3.2, and nothing else (:data:`~cellmask.predict.options.PAPER_EXACT`): it is applied after
``--config`` and ``--set`` and wins over the config; a ``--set`` contradicting it is an error.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellmask.config import add_override_argument
from cellmask.predict.options import config_path_for, is_paper_exact, save_predict_config

__all__ = [
    "PredictResult",
    "add_common_arguments",
    "add_predict_arguments",
    "cli_predict",
    "common_options",
    "format_timings",
    "predict_folder",
]


@dataclass
class PredictResult:
    """What :func:`predict_folder` did.

    Attributes:
        submission: the ``submission.csv`` written.
        config: the resolved config written beside it.
        instances: ``{image_id: number of instances}`` in image order.
        problems: :func:`~cellmask.submission.check_submission`'s findings (empty: valid).
        timings: seconds per stage (``read``, ``detect <branch>``, ``wbf``, ``segmenter``,
            ``postprocess``, ``rle``, ``overlays``).
        seconds: wall time of the whole call.
        runs: :meth:`Predictor.describe_runs`.
        options: the resolved ``predict`` section.
        overlays: the overlay folder, if any.
    """

    submission: Path
    config: Path
    instances: dict[str, int]
    problems: list[str]
    timings: dict[str, float]
    seconds: float
    runs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    overlays: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """A one-screen text summary."""
        counts = np.array(list(self.instances.values()) or [0])
        opts = self.options
        wbf = opts.get("wbf", {})
        branches = "; ".join(
            f"{b['name']} (weight {b.get('weight', 1):g}, {Path(str(b.get('checkpoint'))).name})"
            for b in self.runs.get("branches", [])
        )
        seg = self.runs.get("segmenter", {})
        tta = f"TTA fused {'per model' if opts.get('tta_fusion') == 'per_model' else 'per view'}"
        lines = [
            f"== cellmask predict: {len(self.instances)} images -> {self.submission} "
            f"({'valid' if self.ok else 'INVALID'})",
            f"branches   {branches}",
            f"fusion     {tta if opts.get('tta') else 'TTA off'}; WBF iou_thr {wbf.get('iou_thr')}, "
            f"skip_box_thr {wbf.get('skip_box_thr')}; class vote {'on' if opts.get('class_vote') else 'off'}; "
            f"re-scoring {'on' if opts.get('rescore') else 'off'}; min area "
            f"{'on' if _positive(opts.get('min_area')) else 'off'}"
            + ("; the paper's pipeline (paper-exact)" if opts and is_paper_exact(opts) else ""),
            f"segmenter  {seg.get('name', '?')} ({Path(str(seg.get('checkpoint', '?'))).name})",
            f"instances  {int(counts.sum())} (per image: min {counts.min()}, median {np.median(counts):g}, "
            f"max {counts.max()}; {int((counts == 0).sum())} image(s) without any)",
            f"config     {self.config}" + (f"; overlays in {self.overlays}" if self.overlays else ""),
            f"time       {format_timings(self.timings, self.seconds, len(self.instances))}",
        ]
        lines += [f"  problem: {p}" for p in self.problems[:10]]
        return "\n".join(lines)


def _positive(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(_positive(v) for v in value.values())
    return value is not None and float(value) > 0


def format_timings(timings: Mapping[str, float], total: float, n_images: int) -> str:
    """``"12.3 s (0.41 s/image): detect X 4.0, wbf 0.1, ..."``."""
    per = f" ({total / n_images:.2f} s/image)" if n_images else ""
    parts = ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if v >= 0.05)
    return f"{total:.1f} s{per}" + (f": {parts}" if parts else "")


def predict_folder(
    images: str | Path,
    runs: Sequence[str | Path] | None = None,
    segmenter: str | Path | None = None,
    out: str | Path = "submission.csv",
    *,
    device: str | None = None,
    overlays: str | Path | None = None,
    cache: str | Path | None = None,
    config: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    predictor: Any = None,
    progress: bool = True,
    paper_exact: bool = False,
) -> PredictResult:
    """Predict every image of a folder and write a checked submission with its config.

    Args:
        images: the folder (``test/``); every ``.png``/``.tif``/``.jpg`` in it is an image.
        runs: detector run directories (or checkpoints): any subset of the four branches.
        segmenter: the segmenter run.
        out: the ``submission.csv`` to write; ``<stem>.predict.yaml`` goes beside it.
        device: ``cpu``/``cuda`` (default: ``predict.device``, else CUDA when available).
        overlays: a folder receiving one PNG per image with its instances drawn.
        cache: a detection cache directory (:mod:`cellmask.predict.cache`).
        config: a predict YAML file or mapping (default: the paper's values).
        overrides: ``["predict.x=y", ...]``.
        predictor: an already built :class:`~cellmask.predict.predictor.Predictor` (then
            ``runs``, ``segmenter``, ``device``, ``cache``, ``config``, ``overrides`` and
            ``paper_exact`` are unused).
        progress: tqdm bar.
        paper_exact: the paper's pipeline on top of ``config`` and ``overrides``
            (``--paper-exact``; :func:`~cellmask.predict.options.load_predict_config`).

    Returns:
        a :class:`PredictResult` (``.summary()`` is what the CLI prints).

    Raises:
        FileNotFoundError: a missing folder, run or checkpoint. DataError (CheckpointError):
            an empty folder, an undecodable or colour image, an unreadable checkpoint or one
            that does not fit its config, a run of the wrong kind; each names the file.
    """
    from cellmask.predict.images import list_image_records
    from cellmask.predict.predictor import Predictor
    from cellmask.submission import check_submission, write_submission

    start = time.perf_counter()
    records = list_image_records(images)  # an empty folder fails before any model is loaded
    if predictor is None:
        if not runs or segmenter is None:
            raise ValueError("predict_folder needs runs and a segmenter run (or a predictor)")
        predictor = Predictor.from_runs(
            runs, segmenter, config, overrides, device=device, cache=cache, paper_exact=paper_exact
        )
    predictor.timings.clear()
    counts: dict[str, int] = {}
    rles = predictor.predict_records(records, progress, overlays=overlays, counts=counts)
    out = write_submission(out, rles, image_ids=[r.image_id for r in records])
    config_file = save_predict_config(predictor.options, config_path_for(out), predictor.describe_runs())
    problems = check_submission(out, images)
    return PredictResult(
        submission=out,
        config=config_file,
        instances=counts,
        problems=problems,
        timings=dict(predictor.timings),
        seconds=time.perf_counter() - start,
        runs=predictor.describe_runs(),
        options=dict(predictor.options),
        overlays=Path(overlays) if overlays is not None else None,
    )


def add_common_arguments(p: argparse.ArgumentParser, data: bool = False) -> None:
    """The arguments ``predict``, ``evaluate`` and ``tune`` share: ``--runs``, ``--segmenter``,
    ``--device``, ``--cache``, ``--config``, ``--set``, ``--paper-exact`` (with ``data``: also
    ``--data``, ``--split``)."""
    if data:
        p.add_argument("--data", required=True, metavar="ROOT", help="Kaggle-layout root (train.csv, train/)")
        p.add_argument(
            "--split",
            choices=("val", "all"),
            default="val",
            help="val: the split training held out (default)",
        )
    p.add_argument(
        "--runs", nargs="+", required=True, metavar="RUN", help="detector run directories (or checkpoints)"
    )
    p.add_argument(
        "--segmenter", required=True, metavar="RUN", help="segmenter run directory (or checkpoint)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--cache", default=None, metavar="DIR", help="detection cache: re-runs skip the detectors")
    p.add_argument(
        "--config", default=None, metavar="YAML", help="predict config (default: configs/predict.yaml values)"
    )
    add_override_argument(
        p,
        "override a predict option, e.g. --set predict.tta=false (repeatable; YAML values)",
        metavar="predict.KEY=VALUE",
    )
    p.add_argument(
        "--paper-exact",
        action="store_true",
        help="the paper's pipeline (5.3.2) and nothing else: flip TTA fused per model, WBF 0.6/0.01, "
        "per-box classes and thresholds 0.25/0.55/0.35, overlap removal; no class vote, minimum "
        "area or re-scoring. Applied after --config and --set: it replaces the config's values, "
        "and a --set that contradicts it is an error",
    )


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    """``device``, ``cache``, ``config``, ``overrides``, ``paper_exact`` of
    :func:`add_common_arguments`, as keywords."""
    return {
        "device": args.device,
        "cache": args.cache,
        "config": args.config,
        "overrides": list(args.overrides) or None,
        "paper_exact": bool(args.paper_exact),
    }


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    """The ``cellmask predict`` arguments."""
    p.add_argument("--images", required=True, metavar="DIR", help="folder of gray images (e.g. test/)")
    add_common_arguments(p)
    p.add_argument("--out", default="submission.csv", help="submission to write (default submission.csv)")
    p.add_argument("--overlays", default=None, metavar="DIR", help="write one overlay PNG per image here")


def cli_predict(args: argparse.Namespace) -> int:
    """Handler of ``cellmask predict``: 0, or 1 when the written submission is invalid."""
    result = predict_folder(
        args.images, args.runs, args.segmenter, args.out, overlays=args.overlays, **common_options(args)
    )
    print(result.summary())
    return 0 if result.ok else 1
