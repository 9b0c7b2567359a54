"""The detectors' input/output transform: torchvision's ``GeneralizedRCNNTransform`` with windowed masks.

:class:`CellRCNNTransform` normalises, resizes (``min_size`` / ``max_size``, aspect ratio kept)
and batch-pads images exactly as torchvision's transform does, or, with ``scale`` set, resizes
every image by that one factor whatever its size (``1.0``: native pixels, so training crops and
whole test images see cells at the same size). Two differences for masks:

- **training**: truth masks are *not* resized. torchvision interpolates every image's mask
  stack as float ``[N, 1, H', W']`` (~3.5 MB per cell at 800x1083, 1000+ cells on a LIVECell
  image); here they stay uint8 at the original resolution and the mask head builds its 28x28
  targets from a window of each matched mask (:func:`cellmask.models.mask_head.roi_mask_targets`),
  mapping its RoIs back by the ratio of the mask's size to the resized image's;
- **inference**: ``postprocess`` rescales the boxes to the original image first, then pastes
  each detection's mask probabilities (float ``[N, 1, M, M]`` from the heads) at its rescaled
  box with :func:`cellmask.models.segmenter.paste_masks` (pixel-edge boxes, aligned RoIAlign
  geometry, windowed) and thresholds them: ``masks`` becomes a
  :class:`cellmask.models.segmenter.PastedMasks` in original-image pixels (contract 7), never a
  ``K x H x W`` float stack.

Boxes are float xyxy in the pixel-edge convention throughout (contract 8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor
from torch.nn.functional import interpolate
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from cellmask.models.sections import section
from cellmask.models.segmenter import paste_masks  # moving to cellmask.models.paste (re-exported)

__all__ = ["CellRCNNTransform", "build_transform", "min_size_value"]


class CellRCNNTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` that keeps truth masks at full resolution and pastes windows.

    Args:
        min_size, max_size, image_mean, image_std, size_divisible: as torchvision's.
        scale: a fixed resize factor (``min_size``/``max_size`` unused), or ``None``.
        mask_threshold: probability at which a pasted mask pixel is set (the mask branch's
            ``mask.threshold``); ``None`` for models without masks.
    """

    def __init__(
        self,
        min_size: int | Sequence[int],
        max_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        size_divisible: int,
        mask_threshold: float | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__(min_size, max_size, list(image_mean), list(image_std), size_divisible=size_divisible)
        if scale is not None and not scale > 0:
            raise ValueError(f"model.transform.scale must be a positive factor or null, got {scale}")
        self.mask_threshold = mask_threshold
        self.scale = None if scale is None else float(scale)

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Resize the image and its boxes; leave ``target["masks"]`` at the original size."""
        masks = None
        if target is not None and "masks" in target:
            masks = target["masks"]
            target = {k: v for k, v in target.items() if k != "masks"}
        if self.scale is None:
            image, target = super().resize(image, target)
        elif self.scale != 1.0:
            h, w = image.shape[-2:]
            image = interpolate(
                image[None], scale_factor=self.scale, mode="bilinear", recompute_scale_factor=True
            )[0]
            if target is not None and "boxes" in target:
                target = {**target, "boxes": resize_boxes(target["boxes"], (h, w), tuple(image.shape[-2:]))}
        if target is not None and masks is not None:
            target["masks"] = masks
        return image, target

    def postprocess(
        self,
        result: list[dict[str, Any]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Any]]:
        """Boxes to original-image pixels; mask probabilities pasted there as ``PastedMasks``."""
        if self.training:
            return result
        for pred, size, original in zip(result, image_shapes, original_image_sizes, strict=True):
            pred["boxes"] = resize_boxes(pred["boxes"], size, original)
            if "masks" in pred:
                if self.mask_threshold is None:
                    raise ValueError("masks to paste but no mask_threshold (build with the mask section)")
                pred["masks"], _ = paste_masks(
                    pred["masks"], pred["boxes"], tuple(original), self.mask_threshold, dense=False
                )
        return result


def min_size_value(value: Any) -> int | tuple[int, ...]:
    """``transform.min_size`` as torchvision takes it: an int, or a tuple (multi-scale training;
    one is drawn per image, and the last is used at inference)."""
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return int(value)


def build_transform(model_cfg: Mapping[str, Any], mask_threshold: float | None = None) -> CellRCNNTransform:
    """The transform of a ``model`` config section (``model.transform``: ``min_size``,
    ``max_size``, ``scale``, ``image_mean``, ``image_std``, ``size_divisible``)."""
    t = section(model_cfg, "transform")
    return CellRCNNTransform(
        min_size_value(t["min_size"]),
        int(t["max_size"]),
        [float(v) for v in t["image_mean"]],
        [float(v) for v in t["image_std"]],
        int(t["size_divisible"]),
        mask_threshold=None if mask_threshold is None else float(mask_threshold),
        scale=None if t["scale"] is None else float(t["scale"]),
    )
