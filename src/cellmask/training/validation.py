"""COCO box AP of a detector's predictions (COCO's ``COCOeval``, ``iouType="bbox"``).

The detectors are validated by box AP each epoch, as in the paper's mmdet runs (``bbox_mAP``).

Evaluator: ``faster_coco_eval.COCOeval_faster`` (:data:`BACKENDS`), COCOeval's matching and
accumulation in C++; its figures equal pycocotools' ``COCOeval`` on the same inputs (the tests
compare them within 1e-6), ~100x faster on a dense image (``benchmarks/bench_validation.py``).
Where ``faster-coco-eval`` is not installed, pycocotools' ``COCOeval`` computes the same figures
with the same parameters, after one logged warning (:func:`default_backend`).

``maxDets``: COCO's default caps an image at 100 detections, but a competition image holds up to
~600 cells (LIVECell: more than 1,000), so recall would be capped far below 1. Here the
detection limits are ``(100, 300, 1000)`` by default and AP / AP50 / AP75 are read at the
largest one from ``COCOeval.eval["precision"]`` (``COCOeval.summarize`` would report AP at a
hard-coded 100). Area ranges: only COCO's ``all`` ([0, 1e10] px^2) is evaluated, since it is the
only one reported (COCO's default four ranges would run the matching four times).

Boxes are xyxy pixels everywhere in the package; they become COCO's xywh only in this module.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MAX_DETS: tuple[int, int, int] = (100, 300, 1000)

BACKENDS: tuple[str, ...] = ("faster_coco_eval", "pycocotools")
"""The COCOeval implementations :func:`coco_box_ap` can run: the C++ one first (the default)."""

ALL_AREAS: list[list[float]] = [[0.0, 1e5**2]]
"""COCO's ``all`` area range (px^2), the only one evaluated."""


@functools.cache
def default_backend() -> str:
    """``"faster_coco_eval"`` where it can be imported, else ``"pycocotools"`` (logged once: the
    same figures, ~100x slower on a dense image)."""
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError as exc:
        log.warning(
            "faster-coco-eval cannot be imported (%s): box AP by pycocotools' COCOeval, the same "
            "figures ~100x slower (pip install 'faster-coco-eval>=1.6')",
            exc,
        )
        return "pycocotools"
    return "faster_coco_eval"


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


def _box_annotation(ann_id: int, image_id: int, label: int, box: list[float], **extra: Any) -> dict[str, Any]:
    """One COCO box annotation (``box``: xywh Python floats); ``extra``: e.g. a detection's ``score``."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": label,
        "bbox": box,
        "area": box[2] * box[3],
        **extra,
        "iscrowd": 0,
    }


def _coco_precision(
    gt_dataset: dict[str, list], dt_dataset: dict[str, list], max_dets: Sequence[int], backend: str
) -> tuple[np.ndarray, np.ndarray]:
    """Run COCOeval (``iouType="bbox"``, ``maxDets`` sorted ``max_dets``, area range ``all`` only)
    on two COCO datasets (dicts of ``images``, ``annotations`` (xywh boxes), ``categories``).

    Returns:
        ``(precision, iou_thresholds)``: float64 ``[T, R, K, M]`` (IoU threshold, recall point,
        category, maxDets; -1 where a category has no truth) and ``[T]``.
    """
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        def quiet(*args: Any) -> None:
            return None

        gt, dt = COCO(gt_dataset, print_function=quiet), COCO(dt_dataset, print_function=quiet)
        evaluator = COCOeval_faster(gt, dt, iouType="bbox", print_function=quiet)
    elif backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            gt, dt = COCO(), COCO()
            gt.dataset, dt.dataset = gt_dataset, dt_dataset
            gt.createIndex()
            dt.createIndex()
            evaluator = COCOeval(gt, dt, iouType="bbox")
    else:
        raise ValueError(f"unknown COCOeval backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    evaluator.params.maxDets = sorted(int(m) for m in max_dets)
    evaluator.params.areaRng = [list(r) for r in ALL_AREAS]
    evaluator.params.areaRngLbl = ["all"]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    precision = np.asarray(evaluator.eval["precision"], dtype=np.float64)  # [T, R, K, A=1, M]
    return precision[:, :, :, 0, :], np.asarray(evaluator.params.iouThrs, dtype=np.float64)


def coco_box_ap(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Any],
    num_classes: int | None = None,
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
    backend: str | None = None,
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
        backend: one of :data:`BACKENDS`; ``None``: :func:`default_backend`. Both give the
            same figures.

    Returns:
        ``{"AP", "AP50", "AP75"}`` in [0, 1]: 0.0 when there are no predictions, NaN when the
        truth has no box at all.

    Raises:
        ValueError: ``predictions`` and ``targets`` differ in length; an unknown ``backend``.
        ImportError: the ``backend`` named cannot be imported.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} images")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown COCOeval backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    images, gt_anns, dt_anns, seen = [], [], [], set()
    for image_id, (pred, target) in enumerate(zip(predictions, targets, strict=True), start=1):
        boxes, labels = _truth(target)
        height = getattr(target, "height", None) or int(np.ceil(boxes[:, 3].max(initial=1)))
        width = getattr(target, "width", None) or int(np.ceil(boxes[:, 2].max(initial=1)))
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        for box, label in zip(_xywh(boxes).tolist(), labels.tolist(), strict=True):
            seen.add(label)
            gt_anns.append(_box_annotation(len(gt_anns) + 1, image_id, label, box))
        p_boxes = _as_numpy(pred["boxes"], np.float64, (4,))
        p_scores = _as_numpy(pred["scores"], np.float64)
        p_labels = _as_numpy(pred["labels"], np.int64)
        for box, score, label in zip(
            _xywh(p_boxes).tolist(), p_scores.tolist(), p_labels.tolist(), strict=True
        ):
            dt_anns.append(_box_annotation(len(dt_anns) + 1, image_id, label, box, score=score))
    if not gt_anns:
        return {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
    if not dt_anns:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    category_ids = range(1, num_classes) if num_classes is not None else sorted(seen)
    categories = [{"id": int(c), "name": str(c)} for c in category_ids]

    gt_dataset = {"images": images, "annotations": gt_anns, "categories": categories}
    dt_dataset = {"images": images, "annotations": dt_anns, "categories": categories}
    precision, iou_thrs = _coco_precision(gt_dataset, dt_dataset, max_dets, backend or default_backend())

    def mean_ap(t: int | slice) -> float:
        values = precision[t, :, :, -1]
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
    amp_dtype: Any = "auto",
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
    from cellmask.engine.amp import amp_dtype as autocast_dtype

    dtype = autocast_dtype(amp_dtype, device)  # "auto": the dtype training used on this GPU
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
    amp_dtype: Any = "auto",
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
