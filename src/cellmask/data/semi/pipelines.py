"""[22]'s (Soft Teacher's) default view pipelines, drawn on our fixed ``H x W`` canvas.

Reference: ``configs/soft_teacher/base.py`` and ``ssod/datasets/pipelines/rand_aug.py`` of
microsoft/SoftTeacher. Its ``RandResize(img_scale=[(1333, 400), (1333, 1200)],
multiscale_mode="range", keep_ratio=True)`` draws ``long ~ randint(1333, 1333)`` and
``short ~ randint(400, 1200)`` (both inclusive) and rescales the image by
``min(long / max(h, w), short / min(h, w))``; the test pipeline rescales by the same rule at
``(1333, 800)``.

Our detector's transform resizes every input to ``model.transform``'s size, so a resized
*canvas* would be resized back. The scale the detector sees moves instead by scaling the content
*within* the canvas by ``s = train factor / test factor`` (:func:`draw_resize_scale`): the
content then reaches the detector at ``s`` times its test-time scale, as in [22]. For a
520x704 image ``s`` is uniform on ``[0.5, 1.231)`` with 27% of draws at 1.231 (the 1333 cap on
the long side bites for ``short >= 984``). A view places the scaled image and the canvas at a
uniform relative offset where one contains the other: ``s <= 1`` shows the whole image
(uncovered canvas takes ``fill``), ``s > 1`` a uniformly placed ``H x W`` window of it (what
[22] shows whole, the canvas can only show in part). The weak view clamps ``s`` to
``max_scale`` (1: the teacher's view is never cropped).

The strong view then applies, in a random order ([22]'s ``ShuffledSequential``), one colour op
(:mod:`cellmask.data.semi.randaug`) and one geometric op (``OneOf``, uniform):
``translate_x`` / ``translate_y`` by ``U(-0.1, 0.1)`` of the resized image's width / height,
``rotate`` by ``U(-30, 30)`` degrees about its centre, or ``shear`` (horizontal then vertical,
each ``U(-30, 30)`` degrees, factor ``tanh(angle in radians)`` as the reference computes it, not
``tan``) about its top-left corner (the reference's pixel-centre origin, half a pixel inside);
then :func:`~cellmask.data.semi.views.erase_patches` (``shape="image"``). Every geometric step is
one 3x3 matrix, so the view is one warp of the original image and teacher boxes map onto it
through ``A_strong @ inv(A_weak)`` as the box of their four mapped corners (as the reference's
``Transform2D.transform_bboxes``). A colour op drawn *before* the geometric op is applied to the
original image, before the resize too (one warp instead of two: pointwise ops commute with the
resize; sharpness's 3x3 kernel then works at native pixels); one drawn after works on the view.

Every random draw comes from torch's RNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from cellmask.data.augment import AffineParams, Flip, Op, ShiftScaleRotate, happens, uniform
from cellmask.data.semi.randaug import ColorOneOf, apply_color, draw_color
from cellmask.data.semi.views import (
    rotation_matrix,
    sample_view,
    shear_matrix,
    translation_matrix,
    view_matrix,
    warp_image,
)
from cellmask.data.transforms import Pipeline

__all__ = [
    "GEOMETRIC_OPS",
    "CanvasResize",
    "ViewDraw",
    "build_labeled_transforms",
    "draw_geometric",
    "draw_resize_scale",
    "draw_view",
    "render_view",
    "resize_factor",
]

GEOMETRIC_OPS = ("translate_x", "translate_y", "rotate", "shear")
"""[22]'s geometric ``OneOf``: RandTranslate(x), RandTranslate(y), RandRotate, [RandShear(x),
RandShear(y)]."""

Frame = tuple[float, float, float, float]


def resize_factor(long_edge: float, short_edge: float, height: int, width: int) -> float:
    """mmdet's ``keep_ratio`` rescale factor to ``(long_edge, short_edge)``."""
    return min(long_edge / max(height, width), short_edge / min(height, width))


def _edges(rand_resize: Mapping[str, Any]) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((long lo, long hi), (short lo, short hi))`` of ``img_scale`` (mmdet's range mode)."""
    scales = [tuple(int(v) for v in s) for s in rand_resize["img_scale"]]
    longs, shorts = [max(s) for s in scales], [min(s) for s in scales]
    return (min(longs), max(longs)), (min(shorts), max(shorts))


def _test_factor(rand_resize: Mapping[str, Any], height: int, width: int) -> float:
    test = [int(v) for v in rand_resize["test_scale"]]
    return resize_factor(max(test), min(test), height, width)


def draw_resize_scale(rand_resize: Mapping[str, Any], height: int, width: int) -> float:
    """The content scale ``s`` of one ``RandResize`` draw on an ``height x width`` canvas: the
    drawn train factor over the test factor (integer edges drawn inclusively, torch RNG)."""
    (llo, lhi), (slo, shi) = _edges(rand_resize)
    long_edge = int(torch.randint(llo, lhi + 1, ()))
    short_edge = int(torch.randint(slo, shi + 1, ()))
    return resize_factor(long_edge, short_edge, height, width) / _test_factor(rand_resize, height, width)


def resize_scale_range(rand_resize: Mapping[str, Any], height: int, width: int) -> tuple[float, float]:
    """``(lowest, highest)`` content scale :func:`draw_resize_scale` can draw on this canvas."""
    (llo, lhi), (slo, shi) = _edges(rand_resize)
    test = _test_factor(rand_resize, height, width)
    return resize_factor(llo, slo, height, width) / test, resize_factor(lhi, shi, height, width) / test


def draw_geometric(cfg: Mapping[str, Any], frame: Frame) -> tuple[str, np.ndarray]:
    """One op of the ``geometric`` section (uniform over ``cfg["ops"]``) and its float64 3x3
    matrix in view pixels, about the resized image's ``frame`` ``(x0, y0, x1, y1)``."""
    ops = list(cfg["ops"])
    name = str(ops[int(torch.randint(len(ops), ()))])
    x0, y0, x1, y1 = frame
    if name in ("translate_x", "translate_y"):
        t = uniform(*(float(v) for v in cfg["translate"]))
        if name == "translate_x":
            return name, translation_matrix(t * (x1 - x0), 0.0)
        return name, translation_matrix(0.0, t * (y1 - y0))
    if name == "rotate":
        angle = uniform(*(float(v) for v in cfg["rotate"]))
        return name, rotation_matrix(angle, ((x0 + x1) / 2.0, (y0 + y1) / 2.0))
    if name == "shear":
        lo, hi = (float(v) for v in cfg["shear"])
        ax, ay = uniform(lo, hi), uniform(lo, hi)
        sx, sy = math.tanh(-math.radians(ax)), math.tanh(math.radians(ay))
        return name, shear_matrix(sx, sy, (x0, y0))
    raise ValueError(f"unknown geometric op {name!r}; expected one of {list(GEOMETRIC_OPS)}")


@dataclass(frozen=True)
class ViewDraw:
    """One view's draws.

    Attributes:
        matrix: float64 ``[3, 3]``, original pixel edges -> the view's.
        frame: ``(x0, y0, x1, y1)`` of the resized image in view pixels (before any geometric
            op; may extend past the canvas).
        color: ``(op, magnitude)`` or None.
        color_first: the colour op comes before the geometric op (on the original image).
        geometric: the geometric op's name, or None.
    """

    matrix: np.ndarray
    frame: Frame
    color: tuple[str, int] | None = None
    color_first: bool = False
    geometric: str | None = None


def _frame(matrix: np.ndarray, height: int, width: int) -> Frame:
    corners = matrix @ np.array([[0.0, width, 0.0, width], [0.0, 0.0, height, height], [1.0, 1.0, 1.0, 1.0]])
    return (
        float(corners[0].min()),
        float(corners[1].min()),
        float(corners[0].max()),
        float(corners[1].max()),
    )


def draw_view(cfg: Mapping[str, Any], height: int, width: int) -> ViewDraw:
    """Draw a view of a ``weak``/``strong`` section (merged by
    :func:`~cellmask.data.semi.semi_data_config`) on an ``height x width`` canvas.

    Without ``rand_resize`` this is :func:`~cellmask.data.semi.views.sample_view` (flips, scale,
    shift; the same draws as before); with it, [22]'s pipeline (module doc).
    """
    if cfg.get("rand_resize") is None:
        matrix = sample_view(cfg, height, width)
        return ViewDraw(matrix, _frame(matrix, height, width))
    hflip = happens(float(cfg.get("hflip") or 0.0))
    vflip = happens(float(cfg.get("vflip") or 0.0))
    scale = draw_resize_scale(cfg["rand_resize"], height, width)
    if cfg.get("max_scale") is not None:
        scale = min(scale, float(cfg["max_scale"]))
    slack = abs(scale - 1.0) / 2.0
    dx, dy = uniform(-slack, slack) * width, uniform(-slack, slack) * height
    matrix = view_matrix(height, width, hflip, vflip, scale, (dx, dy))
    frame = _frame(matrix, height, width)
    color_cfg, geo_cfg = cfg.get("color"), cfg.get("geometric")
    color_first = bool(color_cfg) and (not geo_cfg or int(torch.randperm(2)[0]) == 0)
    color = draw_color(color_cfg["ops"], color_cfg["magnitude"]) if color_cfg else None
    geometric = None
    if geo_cfg:
        geometric, g = draw_geometric(geo_cfg, frame)
        matrix = g @ matrix
    return ViewDraw(matrix, frame, color, color_first, geometric)


def render_view(image: np.ndarray, draw: ViewDraw, fill: float = 0) -> np.ndarray:
    """The uint8 ``[H, W]`` view of a uint8 ``[H, W]`` image: the colour op (if drawn first),
    one warp by ``draw.matrix`` (uncovered canvas ``fill``), the colour op (if drawn after)."""
    if draw.color is not None and draw.color_first:
        image = apply_color(image, *draw.color)
    out = warp_image(image, draw.matrix, fill)
    if draw.color is not None and not draw.color_first:
        out = apply_color(out, *draw.color)
    return out


class ResizeDraw(NamedTuple):
    """One :class:`CanvasResize` draw: the ``RandResize`` edges and the placement fractions
    (``U(-1, 1)`` of the free play ``|s - 1| / 2`` of each side)."""

    long_edge: int
    short_edge: int
    fx: float
    fy: float


class CanvasResize(Op):
    """``RandResize`` on the canvas for a :class:`~cellmask.data.transforms.Pipeline`: the content
    scaled by ``s`` (:func:`draw_resize_scale`'s rule, from the image's own size) about the centre
    and placed as in the module doc, by a ``ShiftScaleRotate`` without rotation (constant border
    ``fill``), so masks and boxes follow exactly (the datasets' axis-aligned box path)."""

    geometric = True

    def __init__(self, rand_resize: Mapping[str, Any], fill: float = 0) -> None:
        self.rand_resize = {
            "img_scale": [[int(v) for v in s] for s in rand_resize["img_scale"]],
            "test_scale": [int(v) for v in rand_resize["test_scale"]],
        }
        self.warp = ShiftScaleRotate(p=1.0, shift=0.0, scale=0.0, rotate=0.0, border="constant", fill=fill)

    def draw(self) -> ResizeDraw:
        (llo, lhi), (slo, shi) = _edges(self.rand_resize)
        long_edge = int(torch.randint(llo, lhi + 1, ()))
        short_edge = int(torch.randint(slo, shi + 1, ()))
        return ResizeDraw(long_edge, short_edge, uniform(-1.0, 1.0), uniform(-1.0, 1.0))

    def affine(self, size: tuple[int, int], params: ResizeDraw) -> AffineParams:
        """The ``ShiftScaleRotate`` parameters of a draw on an image of ``size``."""
        height, width = size
        s = resize_factor(params.long_edge, params.short_edge, height, width)
        s /= _test_factor(self.rand_resize, height, width)
        slack = abs(s - 1.0) / 2.0
        return AffineParams(0.0, s, params.fx * slack, params.fy * slack)

    def image(self, image: torch.Tensor, params: ResizeDraw) -> torch.Tensor:
        return self.warp.image(image, self.affine(tuple(image.shape[-2:]), params))

    def layers(self, layers: torch.Tensor, params: ResizeDraw) -> torch.Tensor:
        return self.warp.layers(layers, self.affine(tuple(layers.shape[-2:]), params))

    def index_map(self, size: tuple[int, int], params: ResizeDraw) -> tuple[np.ndarray, np.ndarray]:
        return self.warp.index_map(size, self.affine(size, params))

    def boxes(self, boxes: torch.Tensor, size: tuple[int, int], params: ResizeDraw) -> torch.Tensor:
        return self.warp.boxes(boxes, size, self.affine(size, params))


def build_labeled_transforms(cfg: Mapping[str, Any]) -> Pipeline:
    """[22]'s labeled (``train_pipeline``) augmentation from a ``semi.labeled`` section: resize on
    the canvas, flips, one colour op, in that order (a :class:`~cellmask.data.transforms.Pipeline`
    for :class:`~cellmask.data.datasets.DetectionDataset`, exact boxes and masks)."""
    ops: list[Any] = []
    if cfg.get("rand_resize") is not None:
        ops.append(CanvasResize(cfg["rand_resize"], float(cfg.get("fill") or 0)))
    for key, axis in (("hflip", "horizontal"), ("vflip", "vertical")):
        p = float(cfg.get(key) or 0.0)
        if p > 0:
            ops.append(Flip(axis, p))
    color = cfg.get("color")
    if color:
        ops.append(ColorOneOf(color["ops"], color["magnitude"]))
    return Pipeline(ops)
