"""The geometry and pixel ops of Soft Teacher's views: 3x3 matrices on pixel-edge coordinates
(contract 8: pixel ``i`` spans ``[i, i + 1]``), boxes carried between views, warps and cutout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch


def view_matrix(
    height: int,
    width: int,
    hflip: bool = False,
    vflip: bool = False,
    scale: float = 1.0,
    shift: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """The 3x3 float64 matrix of a view: original pixel-edge ``(x, y, 1)`` -> the view's.

    The view flips (about the centre), scales by ``scale`` about the image centre and then
    translates by ``shift = (dx, dy)`` pixels, on a canvas of the same ``height x width``.
    ``scale > 1`` with a shift crops the scaled image; ``scale < 1`` pads it.
    """
    cx, cy = width / 2.0, height / 2.0
    sx = -scale if hflip else scale
    sy = -scale if vflip else scale
    return np.array(
        [[sx, 0.0, cx + shift[0] - sx * cx], [0.0, sy, cy + shift[1] - sy * cy], [0.0, 0.0, 1.0]],
        dtype=np.float64,
    )


def relative_matrix(
    from_matrix: torch.Tensor | np.ndarray, to_matrix: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """``to @ inv(from)``: coordinates of the ``from`` view -> the ``to`` view (both of one image).

    Accepts ``[3, 3]`` or batched ``[B, 3, 3]``; computed in float64, returned float64.
    """
    a = torch.as_tensor(from_matrix, dtype=torch.float64)
    b = torch.as_tensor(to_matrix, dtype=torch.float64, device=a.device)
    return b @ torch.linalg.inv(a)


def transform_boxes(
    boxes: torch.Tensor, matrix: torch.Tensor | np.ndarray, clip_to: tuple[int, int] | None = None
) -> torch.Tensor:
    """Map xyxy boxes through a 3x3 matrix: the four corners, then their min/max.

    Exact for axis-aligned maps (flips, scales, shifts); for a rotation it gives the box of the
    rotated box. Computed in float32 with autocast off (contract 9).

    Args:
        boxes: ``[N, 4]`` xyxy (any float dtype, any device).
        matrix: ``[3, 3]`` mapping ``(x, y, 1)`` of the boxes' frame to the target frame.
        clip_to: ``(H, W)`` of the target canvas: coordinates clamped to ``[0, W] x [0, H]``.

    Returns:
        float32 ``[N, 4]`` on ``boxes``' device.
    """
    device = boxes.device
    with torch.autocast(device_type=device.type, enabled=False):
        b = boxes.reshape(-1, 4).to(torch.float32)
        m = torch.as_tensor(matrix, device=device).to(torch.float32)
        xs = b[:, [0, 2, 0, 2]]
        ys = b[:, [1, 1, 3, 3]]
        tx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
        ty = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        out = torch.stack([tx.amin(1), ty.amin(1), tx.amax(1), ty.amax(1)], dim=1)
        if clip_to is not None:
            height, width = clip_to
            out[:, 0::2] = out[:, 0::2].clamp(0, float(width))
            out[:, 1::2] = out[:, 1::2].clamp(0, float(height))
    return out


def warp_image(image: np.ndarray, matrix: np.ndarray, fill: float = 0) -> np.ndarray:
    """Warp an ``[H, W]`` (or ``[H, W, C]``) image by a view matrix onto a canvas of the same size.

    The matrix works on pixel edges; OpenCV samples pixel centres, so the map given to
    ``cv2.warpAffine`` is ``T(-0.5) @ matrix @ T(0.5)``. Bilinear, uncovered pixels ``fill``.
    """
    height, width = image.shape[:2]
    centre = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    back = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    m = back @ np.asarray(matrix, dtype=np.float64) @ centre
    return cv2.warpAffine(
        np.ascontiguousarray(image),
        m[:2],
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=float(fill),
    )


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _scale_range(value: Any) -> tuple[float, float]:
    """A view's ``scale``: ``[lo, hi]``, a scalar ``r`` (``[1 - r, 1 + r]``) or null (1)."""
    if value is None:
        return 1.0, 1.0
    if np.isscalar(value):
        return 1.0 - float(value), 1.0 + float(value)
    return float(value[0]), float(value[1])


def sample_view(view_cfg: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Draw a view matrix from a ``weak``/``strong`` section (torch RNG): flips with their
    probabilities, scale from ``[lo, hi]``, shift from ``[-shift, shift] x (W, H)``."""
    hflip = float(torch.rand(())) < float(view_cfg.get("hflip") or 0.0)
    vflip = float(torch.rand(())) < float(view_cfg.get("vflip") or 0.0)
    scale = _uniform(*_scale_range(view_cfg.get("scale")))
    shift = float(view_cfg.get("shift") or 0.0)
    dx = _uniform(-shift, shift) * width
    dy = _uniform(-shift, shift) * height
    return view_matrix(height, width, hflip, vflip, scale, (dx, dy))


def erase_patches(
    image: torch.Tensor,
    count: Sequence[int] = (1, 5),
    size: Sequence[float] = (0.05, 0.2),
    fill: float = 0,
) -> torch.Tensor:
    """Cutout: fill ``randint(count)`` square patches (side ``U(size) x min(H, W)``, anywhere
    inside the image) with ``fill``; torch RNG. ``image`` ``[C, H, W]``; returns a new tensor."""
    out = image.clone()
    height, width = out.shape[-2:]
    n = int(torch.randint(int(count[0]), int(count[1]) + 1, ()))
    for _ in range(n):
        side = max(1, round(_uniform(float(size[0]), float(size[1])) * min(height, width)))
        y0 = int(torch.randint(0, max(height - side, 0) + 1, ()))
        x0 = int(torch.randint(0, max(width - side, 0) + 1, ()))
        out[..., y0 : y0 + side, x0 : x0 + side] = fill
    return out
