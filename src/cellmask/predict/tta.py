"""Detections and flip test-time augmentation: run one branch on a batch of images and views.

Each branch sees every image as-is (view ``"identity"``) and, with TTA, mirrored left-right
(view ``"hflip"``). Boxes found on the mirrored image are mapped back exactly: in the
pixel-edge convention (contract 8) a box edge at ``x`` in an image of width ``W`` sits at
``W - x`` in the mirror, so the un-flipped box is ``[W - x1, y0, W - x0, y1]`` (x0 and x1 swap).
The subtraction is done in float64, where it is exact for float32 inputs.

Images of another size than the models were trained on need nothing here: the detectors' own
transform (``GeneralizedRCNNTransform``) resizes its input and maps the boxes back to the
pixels of the image it was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["VIEWS", "Detections", "flip_boxes", "run_detector", "views_for"]

VIEWS = ("identity", "hflip")
"""The TTA views, in the order their detections are listed."""


@dataclass
class Detections:
    """The detections of one image (one branch and view, or fused).

    Attributes:
        boxes: float64 ``[K, 4]`` xyxy, pixel-edge, pixels of the original image.
        scores: float32 ``[K]``.
        labels: int64 ``[K]`` (1 shsy5y, 2 cort, 3 astro).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if not len(self.boxes) == len(self.scores) == len(self.labels):
            raise ValueError(
                f"boxes {self.boxes.shape}, scores {self.scores.shape} and labels {self.labels.shape} differ in length"
            )

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0))

    def select(self, index: np.ndarray) -> Detections:
        """The detections at ``index`` (int indices or a bool mask)."""
        return Detections(self.boxes[index], self.scores[index], self.labels[index])


def views_for(tta: bool) -> tuple[str, ...]:
    """``("identity", "hflip")`` with TTA, ``("identity",)`` without."""
    return VIEWS if tta else VIEWS[:1]


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror pixel-edge xyxy boxes left-right in an image of ``width`` pixels (its own inverse).

    Args:
        boxes: ``[K, 4]`` xyxy.

    Returns:
        float64 ``[K, 4]``: ``[W - x1, y0, W - x0, y1]``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def _view(image: torch.Tensor, view: str) -> torch.Tensor:
    if view == "identity":
        return image
    if view == "hflip":
        return torch.flip(image, dims=[-1])
    raise ValueError(f"unknown TTA view {view!r}; known: {VIEWS}")


@torch.no_grad()
def run_detector(
    model: torch.nn.Module,
    images: Sequence[torch.Tensor],
    views: Sequence[str] = VIEWS[:1],
    batch_size: int = 1,
    amp: bool | torch.dtype = False,
) -> list[list[Detections]]:
    """One branch on ``images`` x ``views``, ``batch_size`` (image, view) pairs per forward.

    Args:
        model: a detector in torchvision's ``GeneralizedRCNN`` convention (eval mode is set for
            the call and restored).
        images: float32 ``[3, H, W]`` tensors in 0..1 on the model's device (sizes may differ).
        views: names from :data:`VIEWS`.
        amp: autocast the forward on CUDA: in this dtype (the one the branch trained in on this
            GPU: :func:`cellmask.engine.amp.amp_dtype`), or ``True`` for torch's default; boxes
            come back as float32 (contract 9).

    Returns:
        ``out[i][v]``: the detections of image ``i`` in view ``v``, boxes un-flipped into the
        original image's pixels.
    """
    pairs = [(i, v) for i in range(len(images)) for v in views]
    out: list[list[Detections]] = [[Detections.empty() for _ in views] for _ in images]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), max(1, int(batch_size))):
            chunk = pairs[start : start + max(1, int(batch_size))]
            inputs = [_view(images[i], v) for i, v in chunk]
            device_type = inputs[0].device.type
            dtype = amp if isinstance(amp, torch.dtype) else None
            with torch.autocast(device_type, dtype=dtype, enabled=bool(amp) and device_type == "cuda"):
                results = model(inputs)
            for (i, v), res in zip(chunk, results, strict=True):
                boxes = res["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
                if v == "hflip":
                    boxes = flip_boxes(boxes, int(images[i].shape[-1]))
                out[i][list(views).index(v)] = Detections(
                    boxes, res["scores"].detach().float().cpu().numpy(), res["labels"].detach().cpu().numpy()
                )
    finally:
        model.train(was_training)
    return out
