"""``cellmask tune``: grid-search the per-class score thresholds and the mask threshold.

::

    cellmask tune --data ROOT --runs RUN [RUN ...] --segmenter RUN [--out DIR] [--cache DIR] ...
        [--paper-exact]

On the validation split (as ``cellmask evaluate``) every image is detected and fused once, and
the segmenter runs once on every fused box that any grid point could keep; its probabilities
are kept (float16, on the CPU). A grid point then only re-pastes (once per mask threshold),
thresholds, removes overlaps and scores, so hundreds of points cost minutes, not hours.

Search: for each mask threshold, coordinate ascent over the classes (each class's threshold
swept over the grid with the others fixed, two rounds, starting from the configured values).
With the class vote on (the default) every instance of an image has the image's class, so an
image's score depends on one class threshold only and the classes separate: the sweep is then
the exact optimum over the full product grid. Image scores are memoised per (image, mask
threshold, thresholds that image depends on).

The result is re-scored exactly with the real pipeline (float32 probabilities) for both the
configured and the tuned values, and the gain is printed. ``tuned.predict.yaml`` holds the
configured ``predict`` section with the tuned values: ``cellmask predict --config`` reads it.

The fused detections the search reuses are fused once per image as configured
(``predict.tta_fusion`` included) from the raw per-view detections (the detection cache holds
those, never fused ones), so the search and the exact re-scoring see the configured fusion.
``--paper-exact`` tunes from the paper's pipeline: its thresholds are the starting point, and
the tuned file keeps its other values (no vote, no minimum area, TTA fused per model) with the
tuned thresholds (``paper_exact: false`` there: the thresholds are no longer the paper's).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellmask.data.classes import CLASSES
from cellmask.evaluate.report import write_tune_files

__all__ = [
    "MASK_GRID",
    "SCORE_GRID",
    "TuneResult",
    "add_tune_arguments",
    "cli_tune",
    "tune",
    "tune_predictor",
]

SCORE_GRID: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))
"""Default score thresholds tried per class: 0.05, 0.10, ..., 0.95."""

MASK_GRID: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
"""Default mask probability thresholds tried."""


@dataclass
class TuneResult:
    """What :func:`tune` found.

    Attributes:
        best: ``{"score_thresholds": {class: t}, "mask_threshold": m}``.
        configured: the same keys as configured before tuning (paper defaults unless a config
            said otherwise).
        search_score, search_default: grid-search figures (float16 probabilities) of the two.
        score, default_score: exact competition scores of the two with the real pipeline.
        curves: ``{mask threshold: {class: [(t, score), ...]}}`` of the last sweep.
        evaluations: image-level evaluations made (grid points x images, after memoising).
        grid_points: points of the full grid the search covers.
        config: ``tuned.predict.yaml`` written (or ``None``).
        seconds: wall time.
    """

    best: dict[str, Any]
    configured: dict[str, Any]
    search_score: float
    search_default: float
    score: float
    default_score: float
    curves: dict[float, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)
    evaluations: int = 0
    grid_points: int = 0
    n_images: int = 0
    config: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def gain(self) -> float:
        return self.score - self.default_score

    def summary(self) -> str:
        """One screen: the tuned values beside the configured ones, both scores, the gain."""
        thr = ", ".join(
            f"{c} {self.configured['score_thresholds'].get(c)} -> {self.best['score_thresholds'][c]}"
            for c in CLASSES
        )
        lines = [
            f"== cellmask tune: {self.n_images} validation images, {self.grid_points} grid points "
            f"({self.evaluations} image evaluations) in {self.seconds:.1f} s",
            f"score thresholds  {thr}",
            f"mask threshold    {self.configured['mask_threshold']} -> {self.best['mask_threshold']}",
            f"score (exact)     configured {self.default_score:.4f} -> tuned {self.score:.4f} "
            f"(gain {self.gain:+.4f}; grid search: {self.search_default:.4f} -> {self.search_score:.4f})",
        ]
        if self.config is not None:
            lines.append(f"config            {self.config}  (cellmask predict --config {self.config})")
        if self.files:
            lines.append(
                "files             " + ", ".join(str(p) for k, p in self.files.items() if k != "config")
            )
        return "\n".join(lines)


@dataclass
class _Image:
    """What the search keeps of one image: candidates, their probabilities, the truth."""

    size: tuple[int, int]
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    probs: torch.Tensor  # float16 [K, 1, S, S] on the CPU
    truth: list[str]
    relevant: tuple[str, ...]  # classes whose threshold can change this image's result
    fused: Any = None  # every fused detection (Detections), for the exact re-scoring
    pasted: dict[float, tuple[np.ndarray, list[np.ndarray], np.ndarray]] = field(default_factory=dict)


def _collect(predictor: Any, records: Sequence[Any], lowest: float, progress: bool) -> list[_Image]:
    from cellmask.predict.pipeline import image_class

    opts = predictor.options
    seg = predictor.segmenter
    bs = opts["batch_size"]["segmenter"]
    images = []
    for record, array, tensor, raw in predictor.iter_records(records, progress, "tune: detect + segment"):
        dets = predictor.fuse(raw, tuple(array.shape))
        labels = dets.labels
        if opts["class_vote"] and len(dets):  # the image-type classifier's type, else the vote's
            label = predictor.image_type(tensor) or image_class(
                dets.labels, dets.scores, float(opts["vote_min_score"])
            )
            labels = np.full(len(dets), label, np.int64)
        keep = np.flatnonzero(dets.scores >= lowest)
        boxes = dets.boxes[keep].astype(np.float32)
        b = torch.as_tensor(boxes, device=tensor.device).reshape(-1, 4)
        with predictor._timed("segmenter"):
            rois = torch.cat([torch.zeros((len(b), 1), device=tensor.device), b], 1)
            probs = (
                seg.predict_probs(tensor[None], rois, bs, predictor.segmenter_amp)
                if len(b)
                else torch.zeros((0, 1, 1, 1))
            )
        relevant = tuple(CLASSES[label - 1] for label in sorted(set(labels[keep].tolist())))
        images.append(
            _Image(
                tuple(array.shape),
                boxes,
                dets.scores[keep],
                labels[keep],
                probs.to("cpu", torch.float16),
                list(record.rles()),
                relevant,
                dets,
            )
        )
    return images


def _paste(img: _Image, mask_threshold: float) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    from cellmask.models.segmenter import paste_masks

    if mask_threshold not in img.pasted:
        img.pasted.clear()  # one mask threshold at a time: bounded memory
        pasted, conf = paste_masks(
            img.probs.float(), torch.as_tensor(img.boxes), img.size, mask_threshold, dense=False
        )
        img.pasted[mask_threshold] = (
            pasted.offsets.numpy().astype(np.int64).reshape(-1, 2),
            [w.numpy() for w in pasted.windows],
            conf.numpy().astype(np.float32),
        )
    return img.pasted[mask_threshold]


def _image_score(
    img: _Image, thresholds: Mapping[str, float], mask_threshold: float, opts: Mapping[str, Any]
) -> float:
    from cellmask.metric import image_precision, iou_matrix
    from cellmask.predict.postprocess import filter_by_score, min_area_for, remove_overlaps_windows
    from cellmask.submission import window_to_rle

    keep = (
        np.flatnonzero(filter_by_score(img.scores, img.labels, dict(thresholds))) if len(img.scores) else []
    )
    rles: list[str] = []
    if len(keep):
        offsets, windows, conf = _paste(img, mask_threshold)
        scores = img.scores[keep] * (conf[keep] if opts["rescore"] else 1.0)
        labels = img.labels[keep]
        wins, offs, _ = remove_overlaps_windows(
            [windows[i] for i in keep],
            offsets[keep],
            scores,
            img.size,
            min_area_for(labels, opts["min_area"]),
        )
        rles = [window_to_rle(w, o, img.size[1]) for w, o in zip(wins, offs, strict=True)]
    if not img.truth and not rles:
        return 1.0
    return float(image_precision(iou_matrix(img.truth, rles, *img.size)).mean())


def _as_class_dict(value: Any) -> dict[str, float]:
    if isinstance(value, Mapping):
        return {c: float(value.get(c, 0.0)) for c in CLASSES}
    return dict.fromkeys(CLASSES, float(value or 0.0))


def tune_predictor(
    predictor: Any,
    records: Sequence[Any],
    score_grid: Sequence[float] = SCORE_GRID,
    mask_grid: Sequence[float] = MASK_GRID,
    out: str | Path | None = None,
    rounds: int = 2,
    verify: bool = True,
    progress: bool = True,
) -> TuneResult:
    """The search of :func:`tune` on a built predictor and truth records (module docstring)."""
    start = time.perf_counter()
    opts = predictor.options
    configured = {
        "score_thresholds": _as_class_dict(opts["score_thresholds"]),
        "mask_threshold": float(
            predictor.segmenter.threshold if opts["mask_threshold"] is None else opts["mask_threshold"]
        ),
    }
    score_grid = sorted(
        {round(float(t), 4) for t in score_grid} | set(configured["score_thresholds"].values())
    )
    mask_grid = sorted({round(float(m), 4) for m in mask_grid} | {configured["mask_threshold"]})
    images = _collect(predictor, records, min(score_grid), progress)
    memo: dict[tuple, float] = {}

    def total(thresholds: Mapping[str, float], m: float) -> float:
        values = []
        for k, img in enumerate(images):
            key = (k, m, tuple(thresholds[c] for c in img.relevant))
            if key not in memo:
                memo[key] = _image_score(img, thresholds, m, opts)
            values.append(memo[key])
        return float(np.mean(values)) if values else float("nan")

    from tqdm.auto import tqdm

    search_default = total(configured["score_thresholds"], configured["mask_threshold"])
    # the configured values stand unless a grid point beats them (a tie keeps them)
    best = (search_default, dict(configured["score_thresholds"]), configured["mask_threshold"])
    curves: dict[float, dict[str, list[tuple[float, float]]]] = {}
    for m in tqdm(mask_grid, desc="tune: grid", disable=None if progress else True, leave=False):
        current = dict(configured["score_thresholds"])
        curves[m] = {}
        for _ in range(rounds):
            for c in CLASSES:
                sweep = [(t, total({**current, c: t}, m)) for t in score_grid]
                curves[m][c] = sweep
                current[c] = max(sweep, key=lambda p: (p[1], -abs(p[0] - current[c])))[0]
        score = total(current, m)
        if score > best[0] + 1e-12:
            best = (score, dict(current), m)
    tuned = {"score_thresholds": best[1], "mask_threshold": best[2]}

    exact_default = exact_tuned = float("nan")
    if verify:
        exact_default, exact_tuned = _verify(predictor, records, images, [configured, tuned])
    result = TuneResult(
        best=tuned,
        configured=configured,
        search_score=best[0],
        search_default=search_default,
        score=exact_tuned if verify else best[0],
        default_score=exact_default if verify else search_default,
        curves=curves,
        evaluations=len(memo),
        grid_points=len(mask_grid) * len(score_grid) ** len(CLASSES),
        n_images=len(images),
        seconds=0.0,
    )
    if out is not None:
        result.files = write_tune_files(result, predictor, Path(out))
        result.config = result.files["config"]
    result.seconds = time.perf_counter() - start
    return result


def _verify(
    predictor: Any, records: Sequence[Any], images: Sequence[_Image], variants: Sequence[Mapping[str, Any]]
) -> list[float]:
    """Exact scores of option variants with the real pipeline on the fused detections kept by
    the search (float32 probabilities; the detectors do not run again)."""
    from cellmask.metric import score_submission
    from cellmask.predict.images import read_gray_image
    from cellmask.predict.options import predict_config
    from cellmask.predict.pipeline import ProbabilityStore

    options = [predict_config({**predictor.options, **v}) for v in variants]
    preds: list[dict[str, list[str]]] = [{} for _ in variants]
    store = ProbabilityStore()
    for record, img in zip(records, images, strict=True):
        tensor = predictor.to_tensor(read_gray_image(record.path, (record.height, record.width)))
        store.clear()
        for k, opts in enumerate(options):
            preds[k][record.image_id] = predictor.rles(predictor.finish(tensor, img.fused, opts, store))
    return [score_submission(records, p).score for p in preds]


def tune(
    data: str | Path,
    runs: Sequence[str | Path],
    segmenter: str | Path,
    *,
    split: str = "val",
    out: str | Path | None = "runs/tune",
    score_grid: Sequence[float] = SCORE_GRID,
    mask_grid: Sequence[float] = MASK_GRID,
    device: str | None = None,
    cache: str | Path | None = None,
    config: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    progress: bool = True,
    paper_exact: bool = False,
) -> TuneResult:
    """Tune the per-class score thresholds and the mask threshold of the ensemble on the
    validation split of ``data`` (module docstring).

    Args:
        data: Kaggle-layout root; runs, segmenter: as :func:`~cellmask.evaluate.evaluate`.
        split: ``"val"`` or ``"all"``.
        out: where ``tuned.predict.yaml``, ``tune.json`` and ``tune.png`` go.
        score_grid, mask_grid: the values tried (the configured ones are always added).
        device, cache, config, overrides, paper_exact: as :meth:`Predictor.from_runs`; the
            configured values (the paper's with ``paper_exact``) are the starting point and the
            reference of the gain.

    Returns:
        a :class:`TuneResult` (``.best``, ``.score``, ``.default_score``, ``.gain``, ``.config``).
    """
    from cellmask.evaluate.run import predictor_and_records

    options = {"config": config, "overrides": overrides, "device": device, "cache": cache}
    predictor, records = predictor_and_records(
        data, runs, segmenter, split, paper_exact=paper_exact, **options
    )
    return tune_predictor(predictor, records, score_grid, mask_grid, out, progress=progress)


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """The ``cellmask tune`` arguments."""
    from cellmask.predict.folder import add_common_arguments

    add_common_arguments(p, data=True)
    p.add_argument("--out", default="runs/tune", help="output folder (default runs/tune)")
    for flag, grid, what in (("--score-grid", SCORE_GRID, "score"), ("--mask-grid", MASK_GRID, "mask")):
        p.add_argument(
            flag, type=float, nargs="+", default=list(grid), metavar="T", help=f"{what} thresholds tried"
        )


def cli_tune(args: argparse.Namespace) -> int:
    """Handler of ``cellmask tune``."""
    from cellmask.predict.folder import common_options

    grids = {"score_grid": args.score_grid, "mask_grid": args.mask_grid}
    result = tune(
        args.data, args.runs, args.segmenter, split=args.split, out=args.out, **grids, **common_options(args)
    )
    print(result.summary())
    return 0
