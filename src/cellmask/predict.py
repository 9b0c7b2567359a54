"""Inference: detector boxes -> segmenter masks -> post-processing -> RLE rows.

The pipeline of MDE-CellMask (paper, section 4), for one detector (the seed of the full
pipeline: flip TTA and WBF of the four detectors come in between :func:`detect` and
:func:`segment` later)::

    image uint8 [H, W]
      -> detect(detector, image)                   boxes [K, 4] xyxy, scores [K], labels [K]
      -> image_class(labels, scores)               one cell type per image (score-weighted vote)
      -> keep boxes scoring >= that class's threshold
      -> segment(segmenter, image, boxes)          one mask per box (crop, segment, paste)
      -> postprocess_instances(...)                overlap removal, per-class minimum area
      -> rle_encode                                one submission row per instance

Each competition image holds one cell type, so every instance of an image gets the label of
the image's (score-weighted) majority vote, as Kaggle solutions do: a few mislabelled boxes then neither use
another class's threshold nor another class's minimum area.

The options live in one plain dict (:data:`PREDICT_DEFAULTS`); :func:`predict_config` fills in
what a caller leaves out. Models are rebuilt from the configs their checkpoints carry
(:func:`load_detector`, :func:`load_segmenter`; ``torch.load(..., weights_only=True)``), with
``pretrained`` off: the weights come from the checkpoint, nothing is downloaded.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellmask import CLASSES
from cellmask.data.datasets import image_to_tensor
from cellmask.postprocess import (
    DEFAULT_MIN_AREA,
    DEFAULT_SCORE_THRESHOLDS,
    filter_by_score,
    postprocess_instances,
)

__all__ = [
    "PREDICT_DEFAULTS",
    "detect",
    "image_class",
    "load_detector",
    "load_segmenter",
    "predict_config",
    "predict_image",
    "predict_records",
    "segment",
    "segment_detections",
]

PREDICT_DEFAULTS: dict[str, Any] = {
    "score_thresholds": dict(DEFAULT_SCORE_THRESHOLDS),
    "min_area": dict(DEFAULT_MIN_AREA),
    "vote_min_score": 0.25,
    "mask_threshold": None,
    "batch_size": None,
    "device": None,
}
"""Inference options:

- ``score_thresholds``: per-class detector score thresholds (the paper's: shsy5y 0.25, cort 0.55,
  astro 0.35), or one float for every class;
- ``min_area``: per-class minimum instance area in pixels after overlap removal, or one int;
- ``vote_min_score``: detections scoring at least this vote (with their score) for the image's
  class (all of them vote when none does; :func:`image_class`);
- ``mask_threshold``, ``batch_size``: the segmenter's probability threshold and crops per
  forward pass (``None``: the segmenter's own ``model.predict`` values);
- ``device``: where the models run (``None``: where their parameters are).
"""


def predict_config(cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`PREDICT_DEFAULTS` overridden by ``cfg`` (a ``predict`` section, or a full config
    holding one under ``"predict"``).

    Raises:
        ValueError: an unknown key (a typo would otherwise be ignored silently).
    """
    cfg = dict(cfg or {})
    if isinstance(cfg.get("predict"), Mapping):
        cfg = dict(cfg["predict"])
    unknown = sorted(set(cfg) - set(PREDICT_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown predict option(s) {unknown}; known: {sorted(PREDICT_DEFAULTS)}")
    return {**copy.deepcopy(PREDICT_DEFAULTS), **copy.deepcopy(cfg)}


# --------------------------------------------------------------------------------------------
# models from checkpoints


def _offline_backbone(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``model_cfg`` with ImageNet weights off (the checkpoint holds every weight)."""
    cfg = copy.deepcopy(dict(model_cfg))
    backbone = dict(cfg.get("backbone") or {})
    backbone["pretrained"] = False
    backbone.pop("weights_file", None)
    cfg["backbone"] = backbone
    return cfg


def _load(path: str | Path, device: str | torch.device) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """``(checkpoint, its config, its state_dict)``; the config is needed to rebuild the model."""
    from cellmask.engine import CheckpointError, checkpoint_state_dict, load_checkpoint

    ckpt = load_checkpoint(path, map_location=device)
    cfg = ckpt.get("config")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model"), Mapping):
        raise CheckpointError(f"{path}: holds no config with a model section (written by `cellmask train`?)")
    return ckpt, dict(cfg), checkpoint_state_dict(ckpt, path)


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a detector from a ``cellmask train`` checkpoint (``best.pt``, ``epoch_XXX.pt``).

    Returns:
        ``(model in eval mode on device, the run's resolved config)``.

    Raises:
        FileNotFoundError: no such file (the message names it).
        CheckpointError: unreadable, or not a detector checkpoint.
    """
    from cellmask.engine import CheckpointError
    from cellmask.models import build_detector
    from cellmask.models.segmenter import is_segmenter_config

    _, cfg, state = _load(path, device)
    if is_segmenter_config(cfg):
        raise CheckpointError(f"{path}: is a segmenter checkpoint, expected a detector")
    num_classes = int((cfg.get("data") or {}).get("num_classes", len(CLASSES) + 1))
    model = build_detector(_offline_backbone(cfg["model"]), num_classes=num_classes)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the segmenter from a ``cellmask train`` checkpoint.

    Returns:
        ``(Segmenter in eval mode on device, the run's resolved config)``.

    Raises:
        FileNotFoundError: no such file (the message names it).
        CheckpointError: unreadable, or not a segmenter checkpoint.
    """
    from cellmask.engine import CheckpointError
    from cellmask.models.segmenter import build_segmenter, is_segmenter_config

    _, cfg, state = _load(path, device)
    if not is_segmenter_config(cfg):
        raise CheckpointError(f"{path}: is a {cfg['model'].get('type')} checkpoint, expected a segmenter")
    model = build_segmenter(_offline_backbone(cfg["model"]))
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


# --------------------------------------------------------------------------------------------
# the steps


def _device_of(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def detect(
    model: torch.nn.Module, image: np.ndarray | torch.Tensor, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a detector on one image.

    Args:
        model: a detector (torchvision ``GeneralizedRCNN`` convention); run in eval mode, its
            mode restored afterwards.
        image: uint8 ``[H, W]`` gray, or float ``[3, H, W]`` in 0..1.

    Returns:
        ``(boxes float32 [K, 4] xyxy pixels of the image, scores float32 [K], labels int64 [K])``
        on the CPU, in the detector's order (descending score).
    """
    device = _device_of(model, device)
    was_training = model.training
    model.eval()
    try:
        out = model([image_to_tensor(image).to(device)])[0]
    finally:
        model.train(was_training)
    return (
        out["boxes"].detach().float().cpu().reshape(-1, 4),
        out["scores"].detach().float().cpu().reshape(-1),
        out["labels"].detach().cpu().long().reshape(-1),
    )


def image_class(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    scores: Sequence[float] | np.ndarray | torch.Tensor,
    min_score: float = 0.25,
) -> int | None:
    """The image's cell type by a score-weighted majority vote of its detections.

    Each image holds one cell type. Detections scoring at least ``min_score`` vote with their
    score (all detections vote when none reaches it); the label with the largest summed score
    wins, ties going to the label with more votes, then to the lower label. Weighting by score
    and leaving out the many low-score boxes is what makes the vote robust: on the demo's
    validation images a plain count over every box picked the wrong type in 4 of 16 images
    (sparse astro images have many weak "cort" boxes), the weighted vote over boxes >= 0.25 in
    none.

    Returns:
        the winning label (1 shsy5y, 2 cort, 3 astro), or ``None`` without any detection.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    if labels.size == 0:
        return None
    voters = scores >= min_score
    if not voters.any():
        voters[:] = True
    votes, weights = labels[voters], scores[voters]
    candidates = np.unique(votes)  # ascending: the stable sort below leaves full ties to the lower label
    sums = np.array([weights[votes == c].sum() for c in candidates])
    counts = np.array([np.count_nonzero(votes == c) for c in candidates])
    best = np.lexsort((-counts, -sums))[0]  # the last key is the primary one
    return int(candidates[best])


def segment(
    segmenter: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    boxes: torch.Tensor | np.ndarray,
    threshold: float | None = None,
    batch_size: int | None = None,
    dense: bool = False,
    device: str | torch.device | None = None,
) -> tuple[Any, torch.Tensor]:
    """Masks of ``boxes`` in ``image``: :meth:`cellmask.models.segmenter.Segmenter.predict`.

    Returns:
        ``(masks, confidences float [K])`` on the CPU: a :class:`~cellmask.models.segmenter.PastedMasks`
        (``dense=False``) or bool ``[K, H, W]``; confidences are the mean probability of each
        mask's pixels.
    """
    device = _device_of(segmenter, device)
    boxes = torch.as_tensor(np.asarray(boxes) if not isinstance(boxes, torch.Tensor) else boxes)
    masks, conf = segmenter.predict(
        image_to_tensor(image).to(device),
        boxes.float().reshape(-1, 4).to(device),
        batch_size=batch_size,
        threshold=threshold,
        dense=dense,
    )
    return masks.to("cpu"), conf.cpu()


def segment_detections(
    segmenter: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    cfg: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Everything after the detector: class vote, score threshold, masks, post-processing.

    Args:
        segmenter: the segmentation module.
        image: uint8 ``[H, W]`` (or float ``[3, H, W]`` in 0..1).
        boxes, scores, labels: the image's detections (:func:`detect`).
        cfg: inference options (:func:`predict_config`).

    Returns:
        ``(masks bool [N, H, W], scores float32 [N], labels int64 [N])``: disjoint, non-empty
        masks in descending score order, every label the image's voted class.
    """
    opts = predict_config(cfg)
    height, width = image.shape[-2:]
    empty = (
        np.zeros((0, height, width), dtype=bool),
        np.zeros(0, dtype=np.float32),
        np.zeros(0, dtype=np.int64),
    )
    label = image_class(labels, scores, float(opts["vote_min_score"]))
    if label is None:
        return empty
    scores_np = scores.detach().cpu().numpy().astype(np.float32).reshape(-1)
    labels_np = np.full(len(scores_np), label, dtype=np.int64)
    thresholds = opts["score_thresholds"]
    if thresholds is not None:  # threshold before segmenting: no mask for boxes that would go
        keep = np.flatnonzero(filter_by_score(scores_np, labels_np, thresholds))
    else:
        keep = np.arange(len(scores_np))
    if keep.size == 0:
        return empty
    pasted, _ = segment(
        segmenter,
        image,
        boxes[torch.from_numpy(keep)],
        threshold=opts["mask_threshold"],
        batch_size=opts["batch_size"],
        dense=False,
        device=opts["device"],
    )
    masks = pasted.dense().numpy()
    return postprocess_instances(
        masks, scores_np[keep], labels_np[keep], thresholds=None, min_area=opts["min_area"]
    )


def predict_image(
    detector: torch.nn.Module,
    segmenter: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    cfg: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole pipeline on one image: :func:`detect`, then :func:`segment_detections`.

    Returns:
        ``(masks bool [N, H, W], scores float32 [N], labels int64 [N])``: disjoint instances,
        ready for RLE encoding.
    """
    opts = predict_config(cfg)
    boxes, scores, labels = detect(detector, image, opts["device"])
    return segment_detections(segmenter, image, boxes, scores, labels, opts)


def predict_records(
    detector: torch.nn.Module,
    segmenter: torch.nn.Module,
    records: Iterable[Any],
    cfg: Mapping[str, Any] | None = None,
    progress: bool = True,
    detections: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, list[str]]:
    """Predict every image of ``records`` (anything with ``image_id``, ``path``, ``height``, ``width``).

    Args:
        detector, segmenter: the models (eval mode is set per call).
        records: e.g. :func:`cellmask.data.sartorius.list_images` of ``test/``, or validation
            :class:`~cellmask.data.records.ImageRecord`\\ s.
        cfg: inference options (:func:`predict_config`).
        progress: show a tqdm bar.
        detections: if given, receives ``{image_id: {"boxes", "scores", "labels"}}``, the raw
            detections of each image (e.g. for box AP).

    Returns:
        ``{image_id: [rle, ...]}`` in record order, for
        :func:`cellmask.submission.write_submission` (an image may map to ``[]``).
    """
    from tqdm.auto import tqdm

    from cellmask.data.images import read_image
    from cellmask.data.rle import rle_encode

    opts = predict_config(cfg)
    records = list(records)
    out: dict[str, list[str]] = {}
    for record in tqdm(records, desc="predict", disable=not progress, leave=False):
        image = read_image(record.path, (record.height, record.width))
        boxes, scores, labels = detect(detector, image, opts["device"])
        if detections is not None:
            detections[record.image_id] = {"boxes": boxes, "scores": scores, "labels": labels}
        masks, _, _ = segment_detections(segmenter, image, boxes, scores, labels, opts)
        out[record.image_id] = [rle_encode(m) for m in masks]
    return out
