"""The MDE-CellMask predictor: branches x flip TTA -> WBF -> segmenter -> post-processing -> RLE.

::

    predictor = Predictor.from_runs(["runs/det1", "runs/det2", "runs/det3", "runs/det4"], "runs/seg")
    instances = predictor.predict_image(image)          # uint8 [H, W] -> Instances
    rles = predictor.predict_records(records)           # {image_id: [rle, ...]}

Images are read and detected in chunks of ``batch_size.images``: every branch runs on the
whole chunk (with its TTA views, ``batch_size.detector`` views per forward) before the next
branch starts, and the accelerator's cache is emptied between branches; then each image is
fused (:func:`~cellmask.predict.fusion.fuse_image`, as ``predict.tta_fusion`` says) and finished
(:func:`~cellmask.predict.pipeline.finish_detections`). Time spent per stage accumulates in
:attr:`Predictor.timings` (seconds; the summary and ``benchmarks/bench_inference.py`` print it).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellmask.predict.cache import DetectionCache, ImageKey
from cellmask.predict.fusion import fuse_image
from cellmask.predict.image_type import ImageTyper
from cellmask.predict.options import (
    load_predict_config,
    paper_weight_problems,
    predict_config,
    predict_output_config,
)
from cellmask.predict.pipeline import (
    Instances,
    ProbabilityStore,
    finish_detections,
    segmenter_masks,
)
from cellmask.predict.runs import Branch, RunSpec, load_branches, load_run_model, resolve_run
from cellmask.predict.tta import Detections, run_detector, views_for

__all__ = ["Branch", "Predictor", "RawDetections"]

log = logging.getLogger("cellmask.predict")

RawDetections = dict[str, list[Detections]]
"""One image's raw detections: ``{branch name: [detections of each TTA view]}``."""


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
    """The ensemble predictor (module docstring).

    Args:
        branches: the detectors (any subset of the four; at least one).
        segmenter: the segmentation module (:class:`~cellmask.models.segmenter.Segmenter`).
        options: a ``predict`` section (:func:`~cellmask.predict.options.predict_config`).
        segmenter_run: the run the segmenter came from (recorded next to submissions).
        cache: a detection cache directory (``--cache``), or a :class:`DetectionCache`.

    The models are moved to ``options["device"]`` (``None``: CUDA when available).
    """

    def __init__(
        self,
        branches: Sequence[Branch],
        segmenter: torch.nn.Module,
        options: Mapping[str, Any] | None = None,
        segmenter_run: RunSpec | None = None,
        cache: str | Path | DetectionCache | None = None,
    ) -> None:
        if not branches:
            raise ValueError("the predictor needs at least one detector branch")
        names = [b.name for b in branches]
        if len(set(names)) != len(names):
            raise ValueError(f"branch names must be unique, got {names}")
        self.options = predict_config(options)
        self.device = torch.device(self.options["device"]) if self.options["device"] else _default_device()
        amp = self.options["amp"]
        self.amp = (self.device.type == "cuda") if amp is None else bool(amp)
        self.branches = list(branches)
        self.segmenter_run = segmenter_run
        self.amp_dtypes = {b.name: self._autocast(b.run) for b in self.branches}
        """Each branch's autocast dtype (its training's ``train.amp_dtype`` on this device), or False."""
        self.segmenter_amp = self._autocast(segmenter_run)
        from cellmask.engine.amp import tune_backends

        tune_backends(self.device, fixed_size=True)  # a test folder's images share one size
        for b in self.branches:
            b.model.to(self.device).eval()
        self.segmenter = segmenter.to(self.device).eval()
        self.cache = cache if isinstance(cache, DetectionCache) else DetectionCache(cache)
        self.typer = ImageTyper(self.device)
        self.timings: dict[str, float] = defaultdict(float)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_runs(
        cls,
        runs: Sequence[str | Path],
        segmenter: str | Path,
        config: str | Path | Mapping[str, Any] | None = None,
        overrides: Sequence[str] | Mapping[str, Any] | None = None,
        device: str | None = None,
        cache: str | Path | None = None,
        paper_exact: bool = False,
    ) -> Predictor:
        """Load branches and the segmenter from run directories (or checkpoint files).

        Args:
            runs: detector runs (branch kind, name and WBF weight come from each run's config).
            segmenter: the segmenter run.
            config: a predict YAML file (``configs/predict.yaml``, a tuned one) or a ``predict``
                mapping; ``None``: the defaults.
            overrides: ``["predict.tta=false", ...]`` (as ``--set``) applied on top.
            device: ``"cpu"``/``"cuda"``; overrides ``predict.device``.
            cache: detection cache directory.
            paper_exact: the paper's pipeline on top of ``config`` and ``overrides``
                (``--paper-exact``: :func:`~cellmask.predict.options.load_predict_config`);
                a warning names any branch whose WBF weight is not the paper's.

        Raises:
            FileNotFoundError, CheckpointError: see :func:`~cellmask.predict.runs.resolve_run`
            and :func:`~cellmask.predict.runs.load_run_model` (one message naming the file).
        """
        opts = load_predict_config(config, overrides, paper_exact)
        if device is not None:
            opts = predict_config({**opts, "device": device})
        target = torch.device(opts["device"]) if opts["device"] else _default_device()
        if not runs:
            raise ValueError("give at least one detector run (--runs)")
        specs = [resolve_run(r) for r in runs]  # every run found before any model is loaded
        seg_spec = resolve_run(segmenter)
        branches = load_branches(specs, target)
        seg_model = load_run_model(seg_spec, "segmenter", target)
        if paper_exact and (problems := paper_weight_problems({b.name: b.weight for b in branches})):
            log.warning("--paper-exact, but not the paper's four branches: %s", "; ".join(problems))
        return cls(branches, seg_model, opts, segmenter_run=seg_spec, cache=cache)

    def _autocast(self, run: Any) -> torch.dtype | bool:
        """The dtype inference autocasts ``run``'s model in: the one its training used on this
        hardware (``train.amp_dtype``, ``auto``: bfloat16 where the GPU has it, else float16);
        ``False`` when autocast is off (``amp``; always on the CPU)."""
        from cellmask.engine.amp import amp_dtype

        if not self.amp or self.device.type != "cuda":
            return False
        train = (getattr(run, "config", None) or {}).get("train") or {}
        return amp_dtype(train.get("amp_dtype"), self.device)

    def image_type(self, image: torch.Tensor, options: Mapping[str, Any] | None = None) -> int | None:
        """The image's type by ``predict.type_classifier`` (:class:`~cellmask.predict.image_type.ImageTyper`),
        or ``None`` when the vote decides."""
        with self._timed("image type"):
            return self.typer(image, self.options if options is None else options)

    def describe_runs(self) -> dict[str, Any]:
        """``{"branches": [...], "segmenter": {...}}``: what each model is and where it came from."""
        out: dict[str, Any] = {
            "branches": [
                b.run.describe() | {"name": b.name}
                if b.run
                else {"name": b.name, "weight": b.weight, "checkpoint": None}
                for b in self.branches
            ]
        }
        if self.segmenter_run is not None:
            out["segmenter"] = {k: v for k, v in self.segmenter_run.describe().items() if k != "weight"}
        return out

    def resolved_config(self) -> dict[str, Any]:
        """``{"predict": the resolved options, "runs": describe_runs()}`` (written beside submissions)."""
        return predict_output_config(self.options, self.describe_runs())

    # ------------------------------------------------------------------ stages
    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[stage]`` (CUDA synchronised)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[stage] += time.perf_counter() - start

    def to_tensor(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``[H, W]`` -> float32 ``[3, H, W]`` in 0..1 on the device (the models' input)."""
        from cellmask.data.datasets import image_to_tensor

        return image_to_tensor(image).to(self.device)

    def detect_raw(
        self,
        images: Sequence[torch.Tensor],
        keys: Sequence[ImageKey | None] | None = None,
        views: Sequence[str] | None = None,
        branches: Sequence[str] | None = None,
    ) -> list[RawDetections]:
        """Run the branches, one after another, on ``images`` (a chunk) with their TTA views.

        Args:
            images: float32 ``[3, H, W]`` tensors on the device (:meth:`to_tensor`).
            keys: per image, its :class:`ImageKey` for the detection cache (``None``: no cache).
            views: TTA views (default: from ``predict.tta``).
            branches: names of the branches to run (default: all).

        Returns:
            per image, ``{branch name: [Detections per view]}`` in original-image pixels.
        """
        views = tuple(views or views_for(bool(self.options["tta"])))
        keys = list(keys) if keys is not None else [None] * len(images)
        wanted = [b for b in self.branches if branches is None or b.name in branches]
        out: list[RawDetections] = [{} for _ in images]
        bs = int(self.options["batch_size"]["detector"] or 1)
        for branch in wanted:
            ckey = (
                DetectionCache.branch_key(
                    branch.name, branch.run.fingerprint(), str(self.amp_dtypes[branch.name])
                )
                if branch.run is not None and self.cache.root is not None
                else None
            )
            todo = []
            for i, key in enumerate(keys):
                cached = self.cache.load(ckey, key, views)
                if cached is None:
                    todo.append(i)
                else:
                    out[i][branch.name] = cached
            if todo:
                with self._timed(f"detect {branch.name}"):
                    dets = run_detector(
                        branch.model, [images[i] for i in todo], views, bs, self.amp_dtypes[branch.name]
                    )
                for i, d in zip(todo, dets, strict=True):
                    out[i][branch.name] = d
                    self.cache.save(ckey, keys[i], views, d)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return out

    def fuse(
        self,
        raw: RawDetections,
        image_size: tuple[int, int],
        branches: Sequence[str] | None = None,
        tta: bool | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Detections:
        """WBF of one image's raw detections: the views of each branch as ``predict.tta_fusion``
        says (:func:`~cellmask.predict.fusion.fuse_branches`), each branch with its weight.

        Args:
            raw: from :meth:`detect_raw`.
            branches: the branches to fuse (default: all in ``raw``).
            tta: use the flipped views (default: ``predict.tta``); ``False`` uses view 0 only.
            options: resolved predict options (default this predictor's); with ``class_vote``
                and ``vote_before_wbf`` every view of every branch is relabelled to the image's
                class first (:func:`~cellmask.predict.pipeline.vote_entries`).
        """
        opts = self.options if options is None else options
        tta = bool(opts["tta"]) if tta is None else tta
        n_views = len(views_for(tta))
        chosen = [b for b in self.branches if b.name in raw and (branches is None or b.name in branches)]
        per_branch = [list(raw[b.name][:n_views]) for b in chosen]
        for b, views in zip(chosen, per_branch, strict=True):
            if len(views) < n_views:
                raise ValueError(
                    f"branch {b.name}: TTA fusion asked for but only {len(views)} view(s) detected"
                )
        with self._timed("wbf"):
            return fuse_image(per_branch, [b.weight for b in chosen], image_size, opts)

    def finish(
        self,
        image: torch.Tensor,
        dets: Detections,
        options: Mapping[str, Any] | None = None,
        store: ProbabilityStore | None = None,
    ) -> Instances:
        """Class vote, thresholds, segmenter, re-scoring, overlap removal of one image.

        Args:
            image: float32 ``[3, H, W]`` on the device.
            dets: its fused detections.
            options: a ``predict`` section to use instead of the predictor's (ablation rows).
            store: segmenter probabilities to reuse across calls on the same image.
        """
        opts = self.options if options is None else predict_config(options)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        image_label = self.image_type(image, opts)
        masks_fn = segmenter_masks(
            self.segmenter,
            image,
            dets.boxes,
            opts["mask_threshold"],
            opts["batch_size"]["segmenter"],
            self.segmenter_amp,
            store,
        )

        def timed_masks(keep: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
            with self._timed("segmenter"):
                return masks_fn(keep)

        start = time.perf_counter()
        seg_before = self.timings["segmenter"]
        result = finish_detections(dets, size, opts, timed_masks, image_label)
        self.timings["postprocess"] += time.perf_counter() - start - (self.timings["segmenter"] - seg_before)
        return result

    def rles(self, instances: Instances) -> list[str]:
        """The RLE rows of ``instances`` (timed as the ``rle`` stage)."""
        with self._timed("rle"):
            return instances.rles()

    def predict_image(self, image: np.ndarray | torch.Tensor) -> Instances:
        """The whole pipeline on one image (uint8 ``[H, W]``, any size): its instances."""
        tensor = self.to_tensor(image)
        raw = self.detect_raw([tensor])[0]
        dets = self.fuse(raw, tuple(tensor.shape[-2:]))
        return self.finish(tensor, dets)

    # ------------------------------------------------------------------ folders
    def iter_records(
        self,
        records: Sequence[Any],
        progress: bool = True,
        desc: str = "predict",
        views: Sequence[str] | None = None,
    ) -> Iterator[tuple[Any, np.ndarray, torch.Tensor, RawDetections]]:
        """``(record, uint8 image, device tensor, raw detections)`` per record, detected in
        chunks of ``batch_size.images`` (records: anything with ``image_id``, ``path`` and
        ``height``/``width``, e.g. :func:`~cellmask.data.sartorius.list_images`)."""
        from tqdm.auto import tqdm

        from cellmask.predict.images import read_gray_image

        records = list(records)
        chunk = int(self.options["batch_size"]["images"] or 1)
        with tqdm(
            total=len(records), desc=desc, disable=None if progress else True, leave=False, unit="img"
        ) as bar:
            for start in range(0, len(records), chunk):
                part = records[start : start + chunk]
                with self._timed("read"):
                    arrays = [read_gray_image(r.path, (r.height, r.width)) for r in part]
                    tensors = [self.to_tensor(a) for a in arrays]
                keys = [ImageKey.of(r.image_id, r.path) for r in part]
                raws = self.detect_raw(tensors, keys, views)
                for record, array, tensor, raw in zip(part, arrays, tensors, raws, strict=True):
                    yield record, array, tensor, raw
                    bar.update(1)

    def predict_records(
        self,
        records: Sequence[Any],
        progress: bool = True,
        overlays: str | Path | None = None,
        detections: dict[str, Detections] | None = None,
        counts: dict[str, int] | None = None,
    ) -> dict[str, list[str]]:
        """Predict every record's image.

        Args:
            records: see :meth:`iter_records`.
            progress: a tqdm bar.
            overlays: a folder receiving ``<image_id>.png``, each image with its instances.
            detections: receives each image's fused detections (e.g. for box AP).
            counts: receives each image's number of instances.

        Returns:
            ``{image_id: [rle, ...]}`` in record order (``[]`` for an image without instances),
            for :func:`~cellmask.submission.write_submission`.
        """
        out: dict[str, list[str]] = {}
        for record, array, tensor, raw in self.iter_records(records, progress):
            dets = self.fuse(raw, tuple(array.shape))
            if detections is not None:
                detections[record.image_id] = dets
            inst = self.finish(tensor, dets)
            out[record.image_id] = self.rles(inst)
            if counts is not None:
                counts[record.image_id] = len(inst)
            if overlays is not None:
                from cellmask.plot import save_overlay

                with self._timed("overlays"):
                    save_overlay(
                        Path(overlays) / f"{record.image_id}.png",
                        array,
                        inst.label_image(),
                        title=f"{record.image_id}: {len(inst)} instances",
                    )
        return out
