"""An image's cell type from the image itself: a small convolutional classifier.

Every competition image holds one cell type, and the type is what picks the score threshold
and the minimum area each cell of the image is held to (the metric never looks at a class). The
detectors' class heads decide it poorly when they learnt mostly one type (on the real track,
every held-out shsy5y and astro image was voted cort); this model decides it from the image's
texture instead. It is not in the paper (``--paper-exact`` keeps every box's own class).

Architecture (``model.type: image_type``): each image standardised on its own (zero mean, unit
variance: robust to brightness), ``len(widths)`` blocks of two 3x3 convolutions (BatchNorm,
ReLU; the second of stride 2), global average pooling, one linear layer to the classes. Fully
convolutional: it trains on windows (``augment.crop``) and classifies whole images.

Training follows the detectors' protocol (:class:`cellmask.engine.loop.TrainStep`):
``model(images, targets)`` returns ``{"loss_type": cross-entropy}``. A target's type is the
label of its instances (an image holds one type); a window without any instance does not count.
In eval mode ``model(images)`` returns one ``{"logits": float32 [C], "label": int}`` per image,
``label`` 1-based (1 shsy5y, 2 cort, 3 astro; 0 is never predicted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_TYPE = "image_type"
"""``model.type`` of this model."""


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ImageTypeClassifier(nn.Module):
    """The classifier of the module docstring.

    Args:
        num_classes: classes including background (4 for the competition: background is never
            predicted, the head has ``num_classes - 1`` outputs).
        widths: channels of each block.
    """

    def __init__(self, num_classes: int, widths: Sequence[int]) -> None:
        super().__init__()
        if num_classes < 3:
            raise ValueError(
                f"an image-type classifier needs at least two types, got num_classes={num_classes}"
            )
        if not widths:
            raise ValueError("model.widths: at least one block")
        blocks, c = [], 1
        for w in widths:
            blocks.append(_block(c, int(w)))
            c = int(w)
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(c, num_classes - 1)

    @staticmethod
    def _batch(images: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Each image as float ``[1, 1, H, W]``, standardised on its own (channel 0: gray)."""
        out = []
        for image in images:
            x = image[:1] if image.ndim == 3 else image[None]
            x = x.float()
            out.append(((x - x.mean()) / (x.std() + 1e-6))[None])
        return out

    def logits(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """float32 ``[B, C]``: one row per image (images of one size go through together)."""
        batch = self._batch(images)
        if len({tuple(x.shape) for x in batch}) == 1:
            feats = self.features(torch.cat(batch))
            return self.head(feats.mean(dim=(2, 3))).float()
        return torch.cat([self.head(self.features(x).mean(dim=(2, 3))) for x in batch]).float()

    def forward(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        targets: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, Any]]:
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (each with the labels of its instances)")
            labels = torch.tensor([_type_label(t) for t in targets], device=self.head.weight.device)
            keep = labels > 0
            if not bool(keep.any()):  # every window empty: a zero loss that still reaches every weight
                return {"loss_type": sum(p.sum() for p in self.parameters()) * 0.0}
            images = [img for img, k in zip(images, keep.tolist(), strict=True) if k]
            return {"loss_type": F.cross_entropy(self.logits(images), labels[keep] - 1)}
        logits = self.logits(images)
        return [{"logits": row, "label": int(row.argmax()) + 1} for row in logits]

    def class_dependent_prefixes(self) -> tuple[str, ...]:
        """Parameters re-initialised when the class count changes (``--init``)."""
        return ("head.",)


def _type_label(target: Mapping[str, Any]) -> int:
    """The label most of a target's instances have (0: none)."""
    labels = torch.as_tensor(target.get("labels", []), dtype=torch.int64).reshape(-1)
    labels = labels[labels > 0]
    return int(torch.bincount(labels).argmax()) if len(labels) else 0


def build_image_classifier(model_cfg: Mapping[str, Any], num_classes: int) -> ImageTypeClassifier:
    """The classifier of ``model_cfg`` (``type: image_type``, ``widths``).

    Raises:
        ValueError: another ``model.type``, or no ``widths``.
    """
    if model_cfg.get("type") != IMAGE_TYPE:
        raise ValueError(f"model.type must be {IMAGE_TYPE!r}, got {model_cfg.get('type')!r}")
    if "widths" not in model_cfg:
        raise ValueError("model.widths: the channels of each block, e.g. [16, 32, 64, 96]")
    return ImageTypeClassifier(num_classes, [int(w) for w in model_cfg["widths"]])


@torch.no_grad()
def image_types(model: nn.Module, images: Sequence[torch.Tensor]) -> list[int]:
    """1-based type labels of ``images`` (float ``[3, H, W]`` or ``[H, W]``) in eval mode."""
    was = model.training
    model.eval()
    try:
        return [int(out["label"]) for out in model(list(images))]
    finally:
        model.train(was)
