"""Soft Teacher's colour ops ([22]'s RandAugment list) on gray images, and their one-of draw.

[22]'s ``OneOf`` picks one of nine ops uniformly, each at a magnitude ``m`` drawn uniformly from
``1..9`` (``random_magnitude`` with ``magnitude=10``: ``np.random.randint(1, 10)``) on a scale
of :data:`LEVELS` = 10. The ops (PIL's, as the reference calls them, on the ``L`` image):

=============  =============================================================================
``identity``   the image as is
``autocontrast`` stretch the gray range to 0..255 (``ImageOps.autocontrast``)
``equalize``   histogram equalisation (``ImageOps.equalize``)
``solarize``   invert pixels ``>= min(int(m * 256 / 10), 255)`` (mmcv's ``solarize``)
``color``      ``ImageEnhance.Color`` at ``v = m * 1.8 / 10 + 0.1``: an **identity on a gray
               image** (its degenerate image is the gray image itself); kept in the list, so
               a draw picks an identity with probability 2/9
``contrast``   ``ImageEnhance.Contrast`` at ``v``: blend with the image's mean gray
``brightness`` ``ImageEnhance.Brightness`` at ``v``: blend with black
``sharpness``  ``ImageEnhance.Sharpness`` at ``v``: blend with PIL's 3x3 smoothed image
``posterize``  keep the top ``4 - int(m * 4 / 10)`` bits (``ImageOps.posterize``)
=============  =============================================================================

A gray image repeated to RGB (as the reference reads one) stays gray under every op, and each
op gives the same plane as on the ``L`` image, so applying them to ``L`` is exact.
Every random draw comes from torch's RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from cellmask.data.augment import Op

__all__ = ["COLOR_OPS", "LEVELS", "ColorOneOf", "apply_color", "draw_color"]

COLOR_OPS = (
    "identity",
    "autocontrast",
    "equalize",
    "solarize",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "posterize",
)
"""[22]'s colour list, in its order (``configs/soft_teacher/base.py``: Identity, AutoContrast,
RandEqualize, RandSolarize, RandColor, RandContrast, RandBrightness, RandSharpness,
RandPosterize)."""

LEVELS = 10
"""The magnitude scale (the reference's ``PARAMETER_MAX`` / ``magnitude_limit``)."""

_ENHANCERS = {
    "color": ImageEnhance.Color,
    "contrast": ImageEnhance.Contrast,
    "brightness": ImageEnhance.Brightness,
    "sharpness": ImageEnhance.Sharpness,
}


def enhance_factor(magnitude: int) -> float:
    """The blend factor of the ``ImageEnhance`` ops: ``m * 1.8 / 10 + 0.1`` (0.28..1.72 for m 1..9)."""
    return magnitude * 1.8 / LEVELS + 0.1


def apply_color(image: np.ndarray, name: str, magnitude: int) -> np.ndarray:
    """One colour op at one magnitude on a uint8 ``[H, W]`` gray image (a new uint8 ``[H, W]``).

    Raises:
        ValueError: an unknown op, or an image that is not uint8 ``[H, W]``.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"colour ops take uint8 [H, W] gray images, got {image.dtype} {image.shape}")
    m = int(magnitude)
    if name == "identity":
        return image.copy()
    if name == "solarize":
        threshold = min(int(m * 256 / LEVELS), 255)
        return np.where(image < threshold, image, 255 - image).astype(np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(image), mode="L")
    if name == "autocontrast":
        out = ImageOps.autocontrast(pil)
    elif name == "equalize":
        out = ImageOps.equalize(pil)
    elif name == "posterize":
        out = ImageOps.posterize(pil, 4 - int(m * 4 / LEVELS))
    elif name in _ENHANCERS:
        out = _ENHANCERS[name](pil).enhance(enhance_factor(m))
    else:
        raise ValueError(f"unknown colour op {name!r}; expected one of {list(COLOR_OPS)}")
    return np.asarray(out, dtype=np.uint8).copy()


def check_color(cfg: Any, where: str) -> None:
    """Validate a ``color: {ops: [...], magnitude: [lo, hi]}`` section (``where`` names it).

    Raises:
        ValueError: unknown keys or ops, an empty op list, or magnitudes outside ``0..10``.
    """
    if cfg is None:
        return
    if not isinstance(cfg, dict) or set(cfg) != {"ops", "magnitude"}:
        raise ValueError(f"{where}.color must be null or {{ops: [...], magnitude: [lo, hi]}}, got {cfg!r}")
    ops = list(cfg["ops"] or [])
    unknown = sorted(set(ops) - set(COLOR_OPS))
    if not ops or unknown:
        raise ValueError(
            f"{where}.color.ops: unknown or no op(s) {unknown}; expected some of {list(COLOR_OPS)}"
        )
    lo, hi = (int(v) for v in cfg["magnitude"])
    if not 0 <= lo <= hi <= LEVELS:
        raise ValueError(
            f"{where}.color.magnitude must be [lo, hi] with 0 <= lo <= hi <= {LEVELS}, got {cfg['magnitude']!r}"
        )


def draw_color(ops: Sequence[str], magnitude: Sequence[int]) -> tuple[str, int]:
    """One op (uniform over ``ops``) and its magnitude (uniform integer in ``[lo, hi]``), torch RNG."""
    name = str(ops[int(torch.randint(len(ops), ()))])
    lo, hi = int(magnitude[0]), int(magnitude[1])
    return name, int(torch.randint(lo, hi + 1, ()))


class ColorOneOf(Op):
    """[22]'s colour ``OneOf`` as a :class:`~cellmask.data.augment.Op` (image only, every sample)
    for the labeled pipeline: draws ``(op, magnitude)``, applies it to each ``[H, W]`` plane.

    Args:
        ops: names from :data:`COLOR_OPS`.
        magnitude: ``(lo, hi)`` integers drawn uniformly.
    """

    def __init__(self, ops: Sequence[str], magnitude: Sequence[int]) -> None:
        check_color({"ops": list(ops), "magnitude": list(magnitude)}, "semi")
        self.ops = tuple(str(o) for o in ops)
        self.magnitude = (int(magnitude[0]), int(magnitude[1]))

    def draw(self) -> tuple[str, int]:
        return draw_color(self.ops, self.magnitude)

    def image(self, image: torch.Tensor, params: tuple[str, int]) -> torch.Tensor:
        """``[C, H, W]`` uint8 (or float in ``0..1``, quantised to uint8 for the op and back)."""
        dtype = image.dtype
        planes = image if dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
        out = np.stack([apply_color(p, *params) for p in planes.reshape(-1, *planes.shape[-2:]).numpy()])
        result = torch.from_numpy(out).reshape(image.shape)
        return result if dtype == torch.uint8 else result.to(dtype) / 255.0
