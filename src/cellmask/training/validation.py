"""COCO box AP of a detector's predictions (pycocotools ``COCOeval``, ``iouType="bbox"``).

The detectors are validated by box AP each epoch, as in the paper's mmdet runs (``bbox_mAP``).

``maxDets``: COCO's default caps an image at 100 detections, but a competition image holds up to
~600 cells (LIVECell: more than 1,000), so recall would be capped far below 1. Here the
detection limits are ``(100, 300, 1000)`` by default and AP / AP50 / AP75 are read at the
largest one from ``COCOeval.eval["precision"]`` (``COCOeval.summarize`` would report AP at a
hard-coded 100). Area ranges are not used: every figure is over all object sizes.

Boxes are xyxy pixels everywhere in the package; they become COCO's xywh only in this module.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_MAX_DETS: tuple[int, int, int] = (100, 300, 1000)


def _as_numpy(value: Any, dtype: type, shape_tail: tuple[int, ...] = ()) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype).reshape(-1, *shape_tail)


def _truth(target: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes [N,4], labels [N])`` of an ImageRecord or a ``{"boxes", "labels"}`` dict."""
    if isinstance(target, Mapping):
        boxes, labels = target["boxes"], target["labels"]
    else:
        boxes, labels = target.boxes, target.labels
    return _as_numpy(boxes, np.float64, (4,)), _as_numpy(labels, np.int64)


def _xywh(boxes: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    out[:, 2:] = boxes[:, 2:] - boxes[:, :2]
    return out


def _box_annotation(ann_id: int, image_id: int, label: Any, box: np.ndarray, **extra: Any) -> dict[str, Any]:
    """One COCO box annotation (``box`` xywh); ``extra``: e.g. a detection's ``score``."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": int(label),
        "bbox": [float(v) for v in box],
        "area": float(box[2] * box[3]),
        **extra,
        "iscrowd": 0,
    }


def coco_box_ap(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Any],
    num_classes: int | None = None,
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
) -> dict[str, float]:
    """COCO box AP, AP50 and AP75 of ``predictions`` against ``targets``, image by image.

    Args:
        predictions: one ``{"boxes" [K,4] xyxy, "scores" [K], "labels" [K]}`` per image (tensors
            or arrays), in the order of ``targets``.
        targets: ``ImageRecord``s or ``{"boxes", "labels"}`` dicts with the truth (xyxy pixels).
        num_classes: number of classes INCLUDING background (as ``build_detector`` takes it):
            categories are ``1 .. num_classes - 1``. ``None``: every label seen in the truth.
            Averages run over the categories that have truth (COCO's rule).
        max_dets: detection limits per image; the figures use the largest.

    Returns:
        ``{"AP", "AP50", "AP75"}`` in [0, 1]: 0.0 when there are no predictions, NaN when the
        truth has no box at all.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} images")
    images, gt_anns, dt_anns, seen = [], [], [], set()
    for image_id, (pred, target) in enumerate(zip(predictions, targets, strict=True), start=1):
        boxes, labels = _truth(target)
        height = getattr(target, "height", None) or int(np.ceil(boxes[:, 3].max(initial=1)))
        width = getattr(target, "width", None) or int(np.ceil(boxes[:, 2].max(initial=1)))
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        for box, label in zip(_xywh(boxes), labels, strict=True):
            seen.add(int(label))
            gt_anns.append(_box_annotation(len(gt_anns) + 1, image_id, label, box))
        p_boxes = _as_numpy(pred["boxes"], np.float64, (4,))
        p_scores = _as_numpy(pred["scores"], np.float64)
        p_labels = _as_numpy(pred["labels"], np.int64)
        for box, score, label in zip(_xywh(p_boxes), p_scores, p_labels, strict=True):
            dt_anns.append(_box_annotation(len(dt_anns) + 1, image_id, label, box, score=float(score)))
    if not gt_anns:
        return {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
    if not dt_anns:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    category_ids = range(1, num_classes) if num_classes is not None else sorted(seen)
    categories = [{"id": int(c), "name": str(c)} for c in category_ids]

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt, dt = COCO(), COCO()
        gt.dataset = {"images": images, "annotations": gt_anns, "categories": categories}
        dt.dataset = {"images": images, "annotations": dt_anns, "categories": categories}
        gt.createIndex()
        dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.maxDets = sorted(int(m) for m in max_dets)
        evaluator.evaluate()
        evaluator.accumulate()

    precision = evaluator.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets]
    iou_thrs = evaluator.params.iouThrs

    def mean_ap(t: int | slice) -> float:
        values = precision[t, :, :, 0, -1]
        values = values[values > -1]
        return float(values.mean()) if values.size else float("nan")

    return {
        "AP": mean_ap(slice(None)),
        "AP50": mean_ap(int(np.argmin(np.abs(iou_thrs - 0.5)))),
        "AP75": mean_ap(int(np.argmin(np.abs(iou_thrs - 0.75)))),
    }


def detect(
    model: Any,
    loader: Iterable[tuple[list, list[dict]]],
    device: Any = "cpu",
    amp: bool = False,
    amp_dtype: Any = "float16",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run ``model`` (eval mode, no grad) over ``loader``: ``(predictions, truths)``, one per image.

    Predictions are ``{"boxes" float32 [K, 4] xyxy, "scores" float32 [K], "labels" int64 [K]}``
    on the CPU: the model's outputs are cast to float32 as they leave it, before anything else
    (under autocast a model may return float16 boxes, whose 0.5-1 px steps would blur AP75).
    Truths are the loader's ``{"boxes", "labels"}``. Autocast (``amp``, ``amp_dtype``) only
    covers the model's forward, and only on CUDA. The model's train/eval mode is restored.
    """
    import torch

    device = torch.device(device)
    dtype = getattr(torch, amp_dtype) if isinstance(amp_dtype, str) else amp_dtype
    was_training = model.training
    model.eval()
    predictions, truths = [], []
    try:
        for images, targets in loader:
            with (
                torch.no_grad(),
                torch.autocast(device_type=device.type, dtype=dtype, enabled=amp and device.type == "cuda"),
            ):
                outputs = model([image.to(device) for image in images])
            for output, target in zip(outputs, targets, strict=True):
                predictions.append(
                    {
                        "boxes": output["boxes"].detach().float().cpu(),
                        "scores": output["scores"].detach().float().cpu(),
                        "labels": output["labels"].detach().cpu(),
                    }
                )
                truths.append({"boxes": target["boxes"], "labels": target["labels"]})
    finally:
        model.train(was_training)
    return predictions, truths


def evaluate_detector(
    model: Any,
    loader: Iterable[tuple[list, list[dict]]],
    device: Any = "cpu",
    num_classes: int | None = None,
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
    amp: bool = False,
    amp_dtype: Any = "float16",
    info: Any = None,
) -> dict[str, float]:
    """:func:`detect` over ``loader``, then :func:`coco_box_ap` (predictions and truth both in
    the coordinates of the images the loader gives).

    Distributed (``info``: a :class:`cellmask.engine.DistInfo`): call it on every rank with a
    loader over this rank's shard of the images (``cellmask.engine.shard(indices, info)``); the
    detections and truths of every rank are gathered and put back in image order
    (``cellmask.engine.unshard``), so every rank returns the AP of the whole set, identical to a
    single-process run.
    """
    predictions, truths = detect(model, loader, device, amp=amp, amp_dtype=amp_dtype)
    if info is not None and info.distributed:
        from cellmask.engine import gather_objects, unshard

        parts = gather_objects((predictions, truths), info)
        predictions, truths = unshard([p for p, _ in parts]), unshard([t for _, t in parts])
    return coco_box_ap(predictions, truths, num_classes=num_classes, max_dets=max_dets)
