"""The geometry and pixel ops of Soft Teacher's views: 3x3 matrices on pixel-edge coordinates
(contract 8: pixel ``i`` spans ``[i, i + 1]``), boxes carried between views, warps and cutout.

Matrices map ``(x, y, 1)`` of one frame to another's; a view's is a product of them
(:func:`view_matrix` for flips/scale/shift, :func:`translation_matrix`, :func:`rotation_matrix`,
:func:`shear_matrix` for [22]'s geometric ops), and boxes cross frames as the box of their four
mapped corners (:func:`transform_boxes`)."""

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

    Exact for axis-aligned maps (flips, scales, shifts); under a rotation or a shear it gives the
    box of the rotated (sheared) box, as [22]'s ``Transform2D.transform_bboxes`` does: tight to
    the four mapped corners, loose around a rotated cell. Computed in float32 with autocast off (contract 9).

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
    probabilities, scale from ``[lo, hi]`` (clamped to ``max_scale`` where set), shift from
    ``[-shift, shift] x (W, H)``."""
    hflip = float(torch.rand(())) < float(view_cfg.get("hflip") or 0.0)
    vflip = float(torch.rand(())) < float(view_cfg.get("vflip") or 0.0)
    scale = _uniform(*_scale_range(view_cfg.get("scale")))
    if view_cfg.get("max_scale") is not None:
        scale = min(scale, float(view_cfg["max_scale"]))
    shift = float(view_cfg.get("shift") or 0.0)
    dx = _uniform(-shift, shift) * width
    dy = _uniform(-shift, shift) * height
    return view_matrix(height, width, hflip, vflip, scale, (dx, dy))


def translation_matrix(dx: float, dy: float) -> np.ndarray:
    """The 3x3 float64 translation by ``(dx, dy)`` pixels."""
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]], dtype=np.float64)


def rotation_matrix(angle: float, centre: tuple[float, float]) -> np.ndarray:
    """The 3x3 float64 rotation by ``angle`` degrees about ``centre`` (pixel edges), clockwise on
    screen for a positive angle (``y`` points down), as ``mmcv.imrotate``."""
    a = np.deg2rad(angle)
    c, s = np.cos(a), np.sin(a)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=np.float64)
    return translation_matrix(*centre) @ rot @ translation_matrix(-centre[0], -centre[1])


def shear_matrix(shear_x: float, shear_y: float, origin: tuple[float, float]) -> np.ndarray:
    """The 3x3 float64 shear about ``origin``: first horizontal (``x += shear_x * y``), then
    vertical (``y += shear_y * x``), with ``x, y`` relative to ``origin`` (factors, not angles)."""
    horizontal = np.array([[1.0, shear_x, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float64)
    vertical = np.array([[1.0, 0.0, 0.0], [shear_y, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float64)
    return translation_matrix(*origin) @ vertical @ horizontal @ translation_matrix(-origin[0], -origin[1])


def erase_patches(
    image: torch.Tensor,
    count: Sequence[int] = (1, 5),
    size: Sequence[float] = (0.05, 0.2),
    fill: float = 0,
    shape: str = "square",
    frame: Sequence[float] | None = None,
) -> torch.Tensor:
    """Cutout: fill ``randint(count)`` patches (``count`` inclusive) with ``fill``; torch RNG.

    Args:
        image: ``[C, H, W]``; a new tensor comes back.
        count: ``(lo, hi)`` patches, both inclusive.
        size: ``(lo, hi)`` range of the patch's relative size ``r ~ U(lo, hi)``.
        fill: the patches' value.
        shape: ``"square"``: a square of side ``r x min(H, W)`` anywhere inside the image;
            ``"image"`` ([22]'s ``RandErase(squared=True)``): one ``r`` for both sides, a patch of
            ``int(r h) x int(r w)`` (the frame's aspect ratio), its corner drawn as
            ``randint(0, h - ph)`` (exclusive) inside the frame, the part on the canvas filled.
        frame: ``(x0, y0, x1, y1)`` view pixels of the resized image (``shape="image"``; default
            the whole canvas): [22] erases on the resized image, before any padding.
    """
    out = image.clone()
    height, width = out.shape[-2:]
    n = int(torch.randint(int(count[0]), int(count[1]) + 1, ()))
    if shape == "image":
        x0, y0, x1, y1 = (0.0, 0.0, float(width), float(height)) if frame is None else frame
        left, top = round(x0), round(y0)
        fw, fh = max(round(x1 - x0), 1), max(round(y1 - y0), 1)
        for _ in range(n):
            ratio = _uniform(float(size[0]), float(size[1]))
            ph, pw = int(ratio * fh), int(ratio * fw)
            py = top + int(torch.randint(0, max(fh - ph, 1), ()))
            px = left + int(torch.randint(0, max(fw - pw, 1), ()))
            ys, ye = max(py, 0), min(py + ph, height)
            xs, xe = max(px, 0), min(px + pw, width)
            if ye > ys and xe > xs:
                out[..., ys:ye, xs:xe] = fill
        return out
    if shape != "square":
        raise ValueError(f"erase shape must be 'square' or 'image', got {shape!r}")
    for _ in range(n):
        side = max(1, round(_uniform(float(size[0]), float(size[1])) * min(height, width)))
        y0 = int(torch.randint(0, max(height - side, 0) + 1, ()))
        x0 = int(torch.randint(0, max(width - side, 0) + 1, ()))
        out[..., y0 : y0 + side, x0 : x0 + side] = fill
    return out
