"""Photometric augmentation ops (image only): albumentations' brightness/contrast and blurs.

Same two-step protocol as :class:`cellmask.data.augment.Op`: draw the parameters (torch's RNG),
then apply them to an image ``[C, H, W]`` (uint8, or float in ``0..1``; the same dtype back).
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from cellmask.data.augment import Op, happens, uniform

__all__ = ["Blur", "BlurChoice", "BrightnessContrast"]


class BrightnessContrast(Op):
    """albumentations' ``RandomBrightnessContrast`` (image only), with probability ``p``:
    ``image * alpha + beta * max`` with contrast ``alpha = 1 + U(-contrast, contrast)``, brightness
    ``beta = U(-brightness, brightness)``, ``max`` 255 for uint8 (1 for float), clipped."""

    def __init__(self, p: float, brightness: float, contrast: float) -> None:
        self.p, self.brightness, self.contrast = float(p), float(brightness), float(contrast)

    def draw(self) -> tuple[float, float] | None:
        if not happens(self.p):
            return None
        alpha = 1.0 + uniform(-self.contrast, self.contrast)
        return alpha, uniform(-self.brightness, self.brightness)

    def image(self, image: torch.Tensor, params: tuple[float, float]) -> torch.Tensor:
        alpha, beta = params
        top = 255.0 if image.dtype == torch.uint8 else 1.0
        out = (image.to(torch.float32) * alpha + beta * top).clamp_(0.0, top)
        return out.round_().to(torch.uint8) if image.dtype == torch.uint8 else out.to(image.dtype)


class BlurChoice(NamedTuple):
    """One blur of :class:`Blur`: its probability, the odd kernel sizes drawn uniformly, and (for
    the Gaussian) the sigma range; sigma ``(0, 0)`` takes OpenCV's kernel for the size
    (``cv2.getGaussianKernel(k, 0)``: a fixed table up to k = 7, else sigma
    ``0.3 * ((k - 1) / 2 - 1) + 0.8``), albumentations' default."""

    p: float
    kernels: tuple[int, ...]
    sigma: tuple[float, float] = (0.0, 0.0)


class Blur(Op):
    """A Gaussian or a median blur (image only), at most one per sample: one uniform draw picks
    the Gaussian with probability ``gaussian.p``, the median with ``median.p``, else none.

    This is albumentations' ``OneOf([GaussianBlur, MedianBlur], p)`` with two equally weighted
    members: ``gaussian.p = median.p = p / 2``. Both use OpenCV (``cv2.GaussianBlur`` with
    reflect-101 borders, ``cv2.medianBlur``) as albumentations does.
    """

    def __init__(self, gaussian: BlurChoice | None, median: BlurChoice | None) -> None:
        total = sum(c.p for c in (gaussian, median) if c is not None)
        if total > 1.0 + 1e-9:
            raise ValueError(f"the blur probabilities add up to {total} > 1 (at most one blur is applied)")
        for choice in (gaussian, median):
            if choice is not None and any(k < 3 or k % 2 == 0 for k in choice.kernels):
                raise ValueError(f"blur kernel sizes must be odd and >= 3, got {choice.kernels}")
        self.gaussian, self.median = gaussian, median

    def draw(self) -> tuple[str, int, float] | None:
        u = float(torch.rand(()))
        threshold = 0.0
        for name, choice in (("gaussian", self.gaussian), ("median", self.median)):
            if choice is None:
                continue
            threshold += choice.p
            if u < threshold:
                k = (
                    choice.kernels[int(torch.randint(len(choice.kernels), ()))]
                    if len(choice.kernels) > 1
                    else choice.kernels[0]
                )
                return name, k, uniform(*choice.sigma)
        return None

    def image(self, image: torch.Tensor, params: tuple[str, int, float]) -> torch.Tensor:
        name, k, sigma = params
        dtype = image.dtype
        if name == "median" and dtype != torch.uint8:  # OpenCV's median needs uint8 beyond k = 5
            image = F.to_dtype(image, torch.uint8, scale=True)
        elif name == "gaussian" and dtype not in (torch.uint8, torch.float32):
            image = image.to(torch.float32)
        planes = image.reshape(-1, *image.shape[-2:]).numpy()
        if name == "median":
            out = np.stack([cv2.medianBlur(np.ascontiguousarray(p), k) for p in planes])
        else:
            out = np.stack([cv2.GaussianBlur(p, (k, k), sigmaX=sigma) for p in planes])
        result = torch.from_numpy(out).reshape(image.shape)
        if result.dtype == dtype:
            return result
        return F.to_dtype(result, dtype, scale=True) if name == "median" else result.to(dtype)
