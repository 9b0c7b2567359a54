"""The teacher's side of Soft Teacher: detections on the weak views, pseudo-label selection, the
box-jitter localisation uncertainty, and the teacher's class probabilities of given boxes.

Everything here runs the teacher through torchvision's public parts of a ``FasterRCNN``
(``transform``, ``backbone``, ``rpn``, ``roi_heads`` and its ``box_roi_pool``, ``box_head``,
``box_predictor``, ``box_coder``), never through its internals, and without gradients.

Coordinates: the teacher works in its *internal* frame (the weak view resized by the teacher's
transform); :class:`TeacherPass` carries the 3x3 matrix from the weak view to that frame.
Box math (decoding, jitter, standard deviations) is float32 with autocast off (contract 9).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "TeacherPass",
    "box_head_outputs",
    "class_probabilities",
    "jitter_boxes_gaussian",
    "jitter_uncertainty",
    "refine_boxes",
    "resize_matrices",
    "select_pseudo_labels",
    "teacher_pass",
]


@dataclass
class TeacherPass:
    """What one teacher forward over the weak views gives.

    Attributes:
        features: the teacher's FPN maps (``OrderedDict``), batch of the weak views.
        image_sizes: ``(H, W)`` of each view in the teacher's internal frame.
        to_internal: float64 ``[B, 3, 3]``: weak-view pixel edges -> internal frame.
        boxes, scores, labels: per image, the teacher's detections (``[K, 4]`` xyxy internal
            frame, ``[K]``, ``[K]`` int64) with ``score >= candidate threshold``.
    """

    features: OrderedDict[str, Tensor]
    image_sizes: list[tuple[int, int]]
    to_internal: Tensor
    boxes: list[Tensor]
    scores: list[Tensor]
    labels: list[Tensor]


def resize_matrices(original: list[tuple[int, int]], resized: list[tuple[int, int]], device) -> Tensor:
    """float64 ``[B, 3, 3]`` diagonal maps from each input image to its resized copy, with the
    per-axis ratios torchvision's ``resize_boxes`` uses (``new / old`` of width and height)."""
    mats = torch.zeros((len(original), 3, 3), dtype=torch.float64, device=device)
    for i, ((h0, w0), (h1, w1)) in enumerate(zip(original, resized, strict=True)):
        mats[i, 0, 0] = float(w1) / float(w0)
        mats[i, 1, 1] = float(h1) / float(h0)
        mats[i, 2, 2] = 1.0
    return mats


def select_pseudo_labels(scores: Tensor, thresh: float) -> Tensor:
    """bool ``[K]``: the detections that become pseudo-labels (``score >= thresh``)."""
    return scores >= thresh


@torch.no_grad()
def teacher_pass(teacher: nn.Module, images: list[Tensor], candidate_thresh: float) -> TeacherPass:
    """Run the teacher (which must be in eval mode) on the weak views.

    Args:
        teacher: a torchvision-style ``FasterRCNN``.
        images: float ``[3, H, W]`` weak views in ``0..1``.
        candidate_thresh: detections scoring below it are dropped.
    """
    original = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    image_list, _ = teacher.transform(images)
    features = teacher.backbone(image_list.tensors)
    proposals, _ = teacher.rpn(image_list, features)
    detections, _ = teacher.roi_heads(features, proposals, image_list.image_sizes)
    sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
    boxes, scores, labels = [], [], []
    for det in detections:
        keep = select_pseudo_labels(det["scores"], candidate_thresh)
        boxes.append(det["boxes"][keep].float())
        scores.append(det["scores"][keep].float())
        labels.append(det["labels"][keep])
    to_internal = resize_matrices(original, sizes, image_list.tensors.device)
    return TeacherPass(features, sizes, to_internal, boxes, scores, labels)


def box_head_outputs(
    model: nn.Module,
    features: OrderedDict[str, Tensor],
    boxes: list[Tensor],
    image_sizes: list[tuple[int, int]],
    chunk: int = 4096,
) -> tuple[Tensor, Tensor]:
    """``(class_logits [K, C], box_regression [K, 4C])`` of ``model``'s box head on ``boxes``
    (one ``[K_i, 4]`` per image, internal frame), at most ``chunk`` RoIs per call (RoIAlign of
    ``chunk x 256 x 7 x 7`` floats at a time: a 1000-cell image x 10 jitters stays small).
    Rows follow the images' order then the boxes'."""
    heads = model.roi_heads
    device = features[next(iter(features))].device
    empty = torch.zeros((0, 4), dtype=torch.float32, device=device)
    logits, regs = [], []
    for i, image_boxes in enumerate(boxes):
        for start in range(0, len(image_boxes), chunk):
            part = [empty] * len(boxes)
            part[i] = image_boxes[start : start + chunk].float()
            x = heads.box_head(heads.box_roi_pool(features, part, image_sizes))
            cls, reg = heads.box_predictor(x)
            logits.append(cls)
            regs.append(reg)
    if not logits:
        num_classes = heads.box_predictor.cls_score.out_features
        return empty.new_zeros((0, num_classes)), empty.new_zeros((0, 4 * num_classes))
    return torch.cat(logits), torch.cat(regs)


@torch.no_grad()
def class_probabilities(
    model: nn.Module,
    features: OrderedDict[str, Tensor],
    boxes: list[Tensor],
    image_sizes: list[tuple[int, int]],
    chunk: int = 4096,
) -> Tensor:
    """float32 ``[K, C]`` softmax class probabilities of ``model``'s box head for ``boxes``
    (column 0 = background)."""
    logits, _ = box_head_outputs(model, features, boxes, image_sizes, chunk)
    return torch.softmax(logits.float(), dim=-1)


@torch.no_grad()
def refine_boxes(
    model: nn.Module,
    features: OrderedDict[str, Tensor],
    boxes: list[Tensor],
    labels: list[Tensor],
    image_sizes: list[tuple[int, int]],
    chunk: int = 4096,
) -> list[Tensor]:
    """Each box refined by ``model``'s box regression for its own label, clipped to its image.

    Returns:
        float32 ``[K_i, 4]`` per image (internal frame).
    """
    _, regression = box_head_outputs(model, features, boxes, image_sizes, chunk)
    coder = model.roi_heads.box_coder
    device = regression.device
    out, start = [], 0
    with torch.autocast(device_type=device.type, enabled=False):
        for image_boxes, image_labels, (height, width) in zip(boxes, labels, image_sizes, strict=True):
            k = len(image_boxes)
            reg = regression[start : start + k].float()
            start += k
            if k == 0:
                out.append(image_boxes.new_zeros((0, 4), dtype=torch.float32))
                continue
            decoded = coder.decode(reg, [image_boxes.float()]).reshape(k, -1, 4)
            picked = decoded[torch.arange(k, device=device), image_labels]
            picked[:, 0::2] = picked[:, 0::2].clamp(0, float(width))
            picked[:, 1::2] = picked[:, 1::2].clamp(0, float(height))
            out.append(picked)
    return out


def jitter_boxes_gaussian(boxes: Tensor, times: int, scale: float) -> Tensor:
    """``times`` copies of each box, every coordinate offset by ``N(0, (scale x side)^2)`` with
    ``side`` the box's width (x) or height (y), at least 1 pixel (torch RNG).

    Returns:
        float32 ``[times, K, 4]``.
    """
    with torch.autocast(device_type=boxes.device.type, enabled=False):
        b = boxes.float()
        wh = (b[:, 2:] - b[:, :2]).clamp(min=1.0)
        sides = torch.cat([wh, wh], dim=1)  # w, h, w, h
        noise = torch.randn((times, *b.shape), device=b.device, dtype=torch.float32)
        return b[None] + noise * sides[None] * scale


def jitter_uncertainty(
    boxes: list[Tensor],
    labels: list[Tensor],
    refine: Callable[[list[Tensor], list[Tensor]], list[Tensor]],
    times: int = 10,
    scale: float = 0.06,
) -> list[Tensor]:
    """Soft Teacher's box-jitter localisation uncertainty of each box.

    Each box is jittered ``times`` times (:func:`jitter_boxes_gaussian`), every copy is refined
    by ``refine(boxes per image, labels per image) -> refined boxes per image`` (the teacher's
    box head, :func:`refine_boxes`), and the uncertainty is the standard deviation (over the
    copies) of each refined coordinate divided by the mean refined box's width (x) or height (y)
    (at least 1 pixel), averaged over the four coordinates. A teacher that pulls every copy back
    to the same box gives ~0; one that follows the jitter gives ~``scale``.

    Returns:
        float32 ``[K_i]`` per image.
    """
    jittered = [jitter_boxes_gaussian(b, times, scale) for b in boxes]  # [T, K, 4] each
    flat = [j.reshape(-1, 4) for j in jittered]
    flat_labels = [lab.repeat(times) for lab in labels]
    refined = refine(flat, flat_labels)
    out = []
    for r, b in zip(refined, boxes, strict=True):
        k = len(b)
        if k == 0:
            out.append(torch.zeros((0,), dtype=torch.float32, device=b.device))
            continue
        with torch.autocast(device_type=b.device.type, enabled=False):
            r = r.float().reshape(times, k, 4)
            mean = r.mean(dim=0)
            wh = (mean[:, 2:] - mean[:, :2]).clamp(min=1.0)
            rel = r.std(dim=0) / torch.cat([wh, wh], dim=1)
            out.append(rel.mean(dim=1))
    return out
