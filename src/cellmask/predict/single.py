"""One detector, one image: the pipeline's first API, kept as thin wrappers of the ensemble's.

``detect`` -> ``segment_detections`` (or ``predict_image`` for both, ``predict_records`` for a
folder) is the single-branch pipeline: the :class:`~cellmask.predict.predictor.Predictor` with one
branch, whose fusion is the identity (:mod:`cellmask.predict.fusion`). They take bare models and
an options mapping; new code should use the predictor (``Predictor.from_runs``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from cellmask.data.datasets import image_to_tensor
from cellmask.predict.options import predict_config
from cellmask.predict.pipeline import finish_detections, segmenter_masks
from cellmask.predict.tta import Detections, run_detector

__all__ = ["detect", "predict_image", "predict_records", "segment", "segment_detections"]


def _device_of(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def detect(
    model: torch.nn.Module, image: np.ndarray | torch.Tensor, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a detector on one image (no TTA).

    Args:
        model: a detector (torchvision ``GeneralizedRCNN`` convention); run in eval mode, its
            mode restored afterwards.
        image: uint8 ``[H, W]`` gray, or float ``[3, H, W]`` in 0..1.

    Returns:
        ``(boxes float32 [K, 4] xyxy pixels of the image, scores float32 [K], labels int64 [K])``
        on the CPU, in the detector's order (descending score).
    """
    det = run_detector(model, [image_to_tensor(image).to(_device_of(model, device))])[0][0]
    return (
        torch.from_numpy(det.boxes.astype(np.float32)),
        torch.from_numpy(det.scores),
        torch.from_numpy(det.labels),
    )


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
    """Everything after the detector: :func:`~cellmask.predict.pipeline.finish_detections`.

    Args:
        segmenter: the segmentation module.
        image: uint8 ``[H, W]`` (or float ``[3, H, W]`` in 0..1).
        boxes, scores, labels: the image's detections (:func:`detect`).
        cfg: inference options (:func:`~cellmask.predict.options.predict_config`).

    Returns:
        ``(masks bool [N, H, W], scores float32 [N], labels int64 [N])``: disjoint, non-empty
        masks in descending score order.
    """
    opts = predict_config(cfg)
    tensor = image_to_tensor(image).to(_device_of(segmenter, opts["device"]))
    dets = Detections(
        torch.as_tensor(boxes).cpu().numpy(),
        torch.as_tensor(scores).cpu().numpy(),
        torch.as_tensor(labels).cpu().numpy(),
    )
    masks_fn = segmenter_masks(
        segmenter, tensor, dets.boxes, opts["mask_threshold"], opts["batch_size"]["segmenter"]
    )
    inst = finish_detections(dets, tuple(tensor.shape[-2:]), opts, masks_fn)
    return inst.dense(), inst.scores, inst.labels


def _single(detector: torch.nn.Module, segmenter: torch.nn.Module, cfg: Mapping[str, Any] | None) -> Any:
    from cellmask.predict.predictor import Branch, Predictor

    opts = predict_config(cfg)
    if opts["device"] is None:
        opts["device"] = str(_device_of(detector, None))
    return Predictor([Branch("detector", detector)], segmenter, opts)


def predict_image(
    detector: torch.nn.Module,
    segmenter: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    cfg: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole pipeline on one image with one detector (flip TTA as ``cfg`` says: default on).

    Returns:
        ``(masks bool [N, H, W], scores float32 [N], labels int64 [N])``: disjoint instances,
        ready for RLE encoding.
    """
    inst = _single(detector, segmenter, cfg).predict_image(image)
    return inst.dense(), inst.scores, inst.labels


def predict_records(
    detector: torch.nn.Module,
    segmenter: torch.nn.Module,
    records: Iterable[Any],
    cfg: Mapping[str, Any] | None = None,
    progress: bool = True,
    detections: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, list[str]]:
    """Predict every image of ``records`` (anything with ``image_id``, ``path``, ``height``, ``width``)
    with one detector.

    Args:
        detector, segmenter: the models (eval mode is set per call).
        records: e.g. :func:`cellmask.data.sartorius.list_images` of ``test/``.
        cfg: inference options (:func:`~cellmask.predict.options.predict_config`).
        progress: show a tqdm bar.
        detections: if given, receives ``{image_id: {"boxes", "scores", "labels"}}`` (numpy), the
            detections of each image after TTA fusion (e.g. for box AP).

    Returns:
        ``{image_id: [rle, ...]}`` in record order, for
        :func:`cellmask.submission.write_submission` (an image may map to ``[]``).
    """
    fused: dict[str, Detections] = {}
    out = _single(detector, segmenter, cfg).predict_records(list(records), progress, detections=fused)
    if detections is not None:
        for image_id, det in fused.items():
            detections[image_id] = {
                "boxes": det.boxes.astype(np.float32),
                "scores": det.scores,
                "labels": det.labels,
            }
    return out
