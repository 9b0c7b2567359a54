"""Augmentation ops that draw their random parameters before they touch any pixel.

Each op of a :class:`cellmask.data.transforms.Pipeline` (the geometric ones here, the
photometric ones in :mod:`cellmask.data.photometric`) works in two steps: :meth:`Op.draw` takes
the sample's random parameters from torch's global RNG (``None``: the op is skipped this time),
then :meth:`Op.image`, :meth:`Op.layers` and :meth:`Op.boxes` apply them. A dataset can thus look
at a sample's draws before deciding what to decode: only a rotation needs every instance mask
to get tight boxes (:mod:`cellmask.data.sampling` handles the axis-aligned rest).

Conventions: images are ``[C, H, W]`` tensors (uint8, or float in ``0..1``); instance masks are
label layers (:mod:`cellmask.data.layers`) or binary masks ``[L, H, W]`` (any integer/bool dtype),
warped by nearest neighbour with 0 outside the source (never reflected); boxes are float32
``[N, 4]`` xyxy in pixel edges (pixel ``j`` covers ``[j, j + 1)``), clipped to the output image.

Axis-aligned ops (flip, resize, shift-scale without rotation) sample output pixel ``u`` of each
axis from the source coordinate ``src(u)`` of its centre, i.e. from source pixel
``floor(src(u))`` (:meth:`Op.index_map`). Masks are warped exactly by that sampling, and a box
``[x0, x1)`` maps to the run of output pixels whose ``src`` lies in it: for a mask-tight integer
box this is the warped mask's tight box whenever every source row and column of the box is
sampled; a cell cut by the image border, or one whose extreme row/column a shrink skips, can
have a tighter warped mask (:mod:`cellmask.data.sampling` finds those). Float boxes
(LIVECell's COCO boxes) round to the nearest pixel edge.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import cv2
import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

__all__ = ["AffineParams", "Crop", "Flip", "Op", "Resize", "ShiftScaleRotate"]

Size = tuple[int, int]


def happens(p: float) -> bool:
    """A Bernoulli draw from torch's RNG (no draw for p 0 or 1)."""
    return p >= 1.0 or (p > 0.0 and float(torch.rand(())) < p)


def uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high)) if high > low else float(low)


class Op:
    """One augmentation; subclasses override what they change (the defaults pass through).

    Attributes:
        geometric: True when the op can move pixels (boxes and masks change with it).
    """

    geometric = False

    def draw(self) -> Any | None:
        """This sample's random parameters (torch RNG), or None when the op is skipped."""
        raise NotImplementedError

    def rotates(self, params: Any) -> bool:
        """True when these parameters rotate, i.e. boxes must come from the warped masks."""
        return False

    def out_size(self, size: Size, params: Any) -> Size:
        """Output ``(H, W)`` for an input of ``size``."""
        return size

    def image(self, image: torch.Tensor, params: Any) -> torch.Tensor:
        """Transform an image ``[C, H, W]`` (uint8 or float in ``0..1``; same dtype back)."""
        return image

    def layers(self, layers: torch.Tensor, params: Any) -> torch.Tensor:
        """Transform label layers / binary masks ``[L, H, W]`` (nearest neighbour, 0 outside)."""
        return layers

    def boxes(self, boxes: torch.Tensor, size: Size, params: Any) -> torch.Tensor:
        """Map float32 xyxy pixel-edge boxes ``[N, 4]`` on an image of ``size``."""
        return boxes

    def index_map(self, size: Size, params: Any) -> tuple[np.ndarray, np.ndarray]:
        """For a non-rotating draw: the source row of each output row and the source column of
        each output column (int64 ``[H_out]``, ``[W_out]``; -1 where the output pixel has no
        source). Masks are warped exactly by this sampling (:meth:`layers`)."""
        return np.arange(size[0]), np.arange(size[1])

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


# --- axis-aligned sampling shared by Resize and ShiftScaleRotate ---------------------------------


def _source_coords(n_out: int, scale: float, offset: float) -> np.ndarray:
    """float64 ``[n_out]`` source coordinate of each output pixel centre for the edge-coordinate
    map ``X_out = scale * X_in + offset`` (the nearest source pixel is its floor)."""
    return (np.arange(n_out, dtype=np.float64) + 0.5 - offset) / scale


def _source_index(src: np.ndarray, n_in: int) -> np.ndarray:
    """Nearest source pixel ``floor(src)`` (int64), -1 outside ``0..n_in - 1``."""
    index = np.floor(src).astype(np.int64)
    index[(index < 0) | (index >= n_in)] = -1
    return index


def _gather(masks: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """``masks[..., rows, :][..., cols]`` for index maps (:meth:`Op.index_map`); 0 where -1."""
    iy, ix = torch.from_numpy(rows), torch.from_numpy(cols)
    out = masks.index_select(-2, iy.clamp(min=0)).index_select(-1, ix.clamp(min=0))
    out[..., iy < 0, :] = 0
    out[..., ix < 0] = 0
    return out


def _map_boxes(boxes: torch.Tensor, src_y: np.ndarray, src_x: np.ndarray) -> torch.Tensor:
    """Boxes under an axis-aligned sampling: per axis, the output pixels whose (increasing)
    source coordinate lies in ``[lo, hi)``."""
    out = torch.empty_like(boxes)
    for axis, src in ((0, src_x), (1, src_y)):
        for col in (axis, axis + 2):
            edge = boxes[:, col].double().numpy()
            out[:, col] = torch.from_numpy(np.searchsorted(src, edge, side="left").astype(np.float32))
    return out


class Flip(Op):
    """Horizontal or vertical flip with probability ``p`` (exact on images, masks and boxes)."""

    geometric = True

    def __init__(self, axis: Literal["horizontal", "vertical"], p: float) -> None:
        if axis not in ("horizontal", "vertical"):
            raise ValueError(f"flip axis must be 'horizontal' or 'vertical', got {axis!r}")
        self.axis, self.p = axis, float(p)

    def draw(self) -> bool | None:
        return True if happens(self.p) else None

    def _dim(self) -> int:
        return -1 if self.axis == "horizontal" else -2

    def image(self, image: torch.Tensor, params: Any) -> torch.Tensor:
        return image.flip(self._dim())

    def layers(self, layers: torch.Tensor, params: Any) -> torch.Tensor:
        return layers.flip(self._dim())

    def boxes(self, boxes: torch.Tensor, size: Size, params: Any) -> torch.Tensor:
        lo, extent = (0, size[1]) if self.axis == "horizontal" else (1, size[0])
        out = boxes.clone()
        out[:, lo], out[:, lo + 2] = extent - boxes[:, lo + 2], extent - boxes[:, lo]
        return out

    def index_map(self, size: Size, params: Any) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = np.arange(size[0]), np.arange(size[1])
        return (rows, cols[::-1].copy()) if self.axis == "horizontal" else (rows[::-1].copy(), cols)


class Resize(Op):
    """Resize to a fixed ``(H, W)``: images bilinear (antialiased), masks nearest-exact (pixel
    centres: ``floor((u + 0.5) * in / out)``), boxes by the same sampling."""

    geometric = True

    def __init__(self, size: Size) -> None:
        self.size = (int(size[0]), int(size[1]))

    def draw(self) -> Size:
        return self.size

    def out_size(self, size: Size, params: Size) -> Size:
        return params

    def _coords(self, size: Size) -> tuple[np.ndarray, np.ndarray]:
        (h, w), (oh, ow) = size, self.size
        return _source_coords(oh, oh / h, 0.0), _source_coords(ow, ow / w, 0.0)

    def image(self, image: torch.Tensor, params: Size) -> torch.Tensor:
        return F.resize(image, list(self.size), antialias=True)

    def layers(self, layers: torch.Tensor, params: Size) -> torch.Tensor:
        return _gather(layers, *self.index_map(tuple(layers.shape[-2:]), params))

    def index_map(self, size: Size, params: Size) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = self._coords(size)
        return _source_index(rows, size[0]), _source_index(cols, size[1])

    def boxes(self, boxes: torch.Tensor, size: Size, params: Size) -> torch.Tensor:
        return _map_boxes(boxes, *self._coords(size))


class Crop(Op):
    """A random ``(H, W)`` window at native resolution (every sample): training on crops keeps
    cells at their pixel size while a step costs a fraction of the whole image. An image smaller
    than the window along an axis keeps that whole axis.

    The draw is a pair of fractions ``(fy, fx)`` in ``[0, 1)``; the window's top-left corner is
    ``floor(f * (n - size + 1))`` along each axis of the image it meets, so one draw is exact on
    the image, its masks and its boxes. Boxes of cells the window cuts are clipped to it (their
    tight boxes come from the sampled pixels: :mod:`cellmask.data.sampling`).
    """

    geometric = True

    def __init__(self, size: Size) -> None:
        if len(size) != 2 or any(int(v) <= 0 for v in size):
            raise ValueError(f"crop size must be (H, W) with positive sizes, got {size!r}")
        self.size = (int(size[0]), int(size[1]))

    def draw(self) -> tuple[float, float]:
        return float(torch.rand(())), float(torch.rand(()))

    def _window(self, size: Size, params: tuple[float, float]) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the window on an image of ``size``."""
        h, w = min(self.size[0], size[0]), min(self.size[1], size[1])
        top = min(int(params[0] * (size[0] - h + 1)), size[0] - h)
        left = min(int(params[1] * (size[1] - w + 1)), size[1] - w)
        return top, left, h, w

    def out_size(self, size: Size, params: tuple[float, float]) -> Size:
        _, _, h, w = self._window(size, params)
        return h, w

    def image(self, image: torch.Tensor, params: tuple[float, float]) -> torch.Tensor:
        top, left, h, w = self._window(tuple(image.shape[-2:]), params)
        return image[..., top : top + h, left : left + w].contiguous()

    def layers(self, layers: torch.Tensor, params: tuple[float, float]) -> torch.Tensor:
        return self.image(layers, params)

    def index_map(self, size: Size, params: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        top, left, h, w = self._window(size, params)
        return np.arange(top, top + h), np.arange(left, left + w)

    def boxes(self, boxes: torch.Tensor, size: Size, params: tuple[float, float]) -> torch.Tensor:
        top, left, h, w = self._window(size, params)
        return _map_boxes(boxes, _source_coords(h, 1.0, -top), _source_coords(w, 1.0, -left))


class AffineParams(NamedTuple):
    """One shift-scale-rotate draw: ``angle`` degrees (counter-clockwise on screen), ``scale``
    factor, ``dx`` / ``dy`` shift as fractions of the width / height."""

    angle: float
    scale: float
    dx: float
    dy: float


class ShiftScaleRotate(Op):
    """albumentations' ``ShiftScaleRotate``: rotate by ``U(-rotate, rotate)`` degrees and scale by
    ``U(1 - scale, 1 + scale)`` about the image centre, shift by ``U(-shift, shift)`` of the
    width/height, with probability ``p``; the image is warped bilinearly with OpenCV.

    ``border="reflect"`` (the authors' albumentations default, ``cv2.BORDER_REFLECT_101``) fills
    the uncovered image area with its mirror image, ``"constant"`` with ``fill``. Masks are never
    reflected: they are 0 there in both modes, so mirrored cells are unlabeled image content.
    That is also what the authors' detectors trained on: albumentations maps their boxes
    geometrically, so a mirrored copy never gets a box.

    Boxes: without rotation they are mapped through the pixel sampling (module doc); a rotation
    needs the warped masks for tight boxes (the dataset decodes them only then); boxes without
    masks are then mapped by their corners (the enclosing box of the rotated box).
    """

    geometric = True

    def __init__(
        self,
        p: float,
        shift: float,
        scale: float,
        rotate: float,
        border: Literal["reflect", "constant"] = "reflect",
        fill: float = 0,
    ) -> None:
        if border not in ("reflect", "constant"):
            raise ValueError(f"border must be 'reflect' or 'constant', got {border!r}")
        if not 0.0 <= scale < 1.0:
            raise ValueError(f"scale must be in [0, 1), got {scale}")
        self.p, self.shift, self.scale, self.rotate = float(p), float(shift), float(scale), float(rotate)
        self.border, self.fill = border, float(fill)

    def draw(self) -> AffineParams | None:
        if not happens(self.p):
            return None
        angle = uniform(-self.rotate, self.rotate)
        scale = uniform(1.0 - self.scale, 1.0 + self.scale)
        return AffineParams(angle, scale, uniform(-self.shift, self.shift), uniform(-self.shift, self.shift))

    def rotates(self, params: AffineParams) -> bool:
        return params.angle != 0.0

    @staticmethod
    def matrix(size: Size, params: AffineParams) -> np.ndarray:
        """float64 ``[2, 3]`` source-to-output matrix in OpenCV pixel-centre coordinates."""
        height, width = size
        m = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), params.angle, params.scale)
        m[0, 2] += params.dx * width
        m[1, 2] += params.dy * height
        return m

    def _coords(self, size: Size, params: AffineParams) -> tuple[np.ndarray, np.ndarray]:
        (h, w), s = size, params.scale
        return (
            _source_coords(h, s, h / 2 * (1 - s) + params.dy * h),
            _source_coords(w, s, w / 2 * (1 - s) + params.dx * w),
        )

    def image(self, image: torch.Tensor, params: AffineParams) -> torch.Tensor:
        size = tuple(image.shape[-2:])
        border = cv2.BORDER_REFLECT_101 if self.border == "reflect" else cv2.BORDER_CONSTANT
        return _warp(image, self.matrix(size, params), cv2.INTER_LINEAR, border, self.fill)

    def layers(self, layers: torch.Tensor, params: AffineParams) -> torch.Tensor:
        size = tuple(layers.shape[-2:])
        if not self.rotates(params):
            return _gather(layers, *self.index_map(size, params))
        return _warp(layers, self.matrix(size, params), cv2.INTER_NEAREST, cv2.BORDER_CONSTANT, 0)

    def index_map(self, size: Size, params: AffineParams) -> tuple[np.ndarray, np.ndarray]:
        if self.rotates(params):
            raise ValueError("a rotation has no per-axis index map")
        rows, cols = self._coords(size, params)
        return _source_index(rows, size[0]), _source_index(cols, size[1])

    def boxes(self, boxes: torch.Tensor, size: Size, params: AffineParams) -> torch.Tensor:
        if not self.rotates(params):
            return _map_boxes(boxes, *self._coords(size, params))
        x0, y0, x1, y1 = boxes.double().numpy().T
        corners = np.stack([np.stack([x, y], -1) for x in (x0, x1) for y in (y0, y1)], 1) - 0.5
        mapped = corners @ self.matrix(size, params)[:, :2].T + self.matrix(size, params)[:, 2] + 0.5
        lo, hi = mapped.min(1), mapped.max(1)
        limit = np.array([size[1], size[0]], dtype=np.float64)
        out = np.concatenate([np.clip(lo, 0, limit), np.clip(hi, 0, limit)], 1)
        return torch.from_numpy(out.astype(np.float32)).reshape(-1, 4)


_CV2_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.float32, torch.float64)


def _warp(planes: torch.Tensor, matrix: np.ndarray, flags: int, border: int, fill: float) -> torch.Tensor:
    """``cv2.warpAffine`` of every ``[H, W]`` plane of a ``[..., H, W]`` tensor (same size back)."""
    shape, dtype = planes.shape, planes.dtype
    work = (
        planes
        if dtype in _CV2_DTYPES
        else planes.to(torch.int32 if not dtype.is_floating_point else torch.float32)
    )
    height, width = shape[-2:]
    hwc = np.ascontiguousarray(work.reshape(-1, height, width).permute(1, 2, 0).numpy())
    value = (fill,) * 4 if border == cv2.BORDER_CONSTANT else 0
    out = cv2.warpAffine(hwc, matrix, (width, height), flags=flags, borderMode=border, borderValue=value)
    out = torch.from_numpy(out.reshape(height, width, -1)).permute(2, 0, 1).reshape(shape)
    return out.to(dtype)
