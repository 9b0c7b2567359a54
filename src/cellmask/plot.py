"""Overlays of instance masks on gray images, for notebooks, docs and debugging.

Everything renders through matplotlib's object API with the Agg canvas (``Figure`` +
``FigureCanvasAgg``): no pyplot state, no GUI backend, nothing shown. Colours are random but
deterministic: instance ``i`` gets the same colour for the same ``seed`` on every call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["instance_colors", "overlay_instances", "overlay_rgb", "save_overlay"]

_KERNEL = np.ones((3, 3), np.uint8)


def instance_colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` bright, well-saturated random colours: uint8 ``[n, 3]`` RGB, the same for the same seed."""
    if n <= 0:
        return np.zeros((0, 3), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    hsv = np.stack(
        [
            rng.integers(0, 180, n),  # OpenCV hue range
            rng.integers(150, 256, n),
            rng.integers(200, 256, n),
        ],
        axis=1,
    ).astype(np.uint8)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


def _as_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim == 2:  # an int label image: 0 background, k > 0 instance k
        labels = np.unique(masks[masks > 0])
        return masks[None] == labels[:, None, None]
    if masks.ndim != 3 or masks.shape[1:] != (height, width):
        raise ValueError(f"masks must be [N, {height}, {width}] (or a label image), got {masks.shape}")
    return masks.astype(bool, copy=False)


def overlay_rgb(
    image: np.ndarray,
    masks: np.ndarray,
    alpha: float = 0.45,
    colors: np.ndarray | None = None,
    contours: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """Blend coloured instances into a gray image.

    Args:
        image: uint8 ``[H, W]`` (or ``[H, W, 3]`` RGB).
        masks: bool ``[N, H, W]``, or an int ``[H, W]`` label image (0 = background).
        alpha: opacity of the fill (0 = outlines only).
        colors: uint8 ``[N, 3]`` RGB; default :func:`instance_colors` ``(N, seed)``.
        contours: draw each instance's outline in its colour at full opacity.
        seed: colour seed when ``colors`` is not given.

    Returns:
        uint8 ``[H, W, 3]`` RGB. Where masks overlap the later instance is on top.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    elif image.ndim == 3 and image.shape[2] == 3:
        rgb = image.astype(np.float32)
    else:
        raise ValueError(f"image must be [H, W] or [H, W, 3], got {image.shape}")
    height, width = rgb.shape[:2]
    masks = _as_masks(masks, height, width)
    n = len(masks)
    colors = instance_colors(n, seed) if colors is None else np.asarray(colors, dtype=np.uint8)
    if n == 0:
        return np.clip(rgb, 0, 255).astype(np.uint8)
    # Tight box of every mask in one pass, then work on crops only.
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    present = rows.any(axis=1)
    y0, y1 = rows.argmax(1), height - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), width - cols[:, ::-1].argmax(1)
    outlines = np.zeros((height, width), dtype=np.int32)  # 1 + index of the outline's instance
    for i in np.flatnonzero(present):
        ys, xs = slice(y0[i], y1[i]), slice(x0[i], x1[i])
        m = masks[i, ys, xs]
        region = rgb[ys, xs]
        region[m] = (1.0 - alpha) * region[m] + alpha * colors[i].astype(np.float32)
        if contours:
            m8 = m.astype(np.uint8)
            edge = (m8 - cv2.erode(m8, _KERNEL, borderType=cv2.BORDER_CONSTANT, borderValue=0)) > 0
            outlines[ys, xs][edge] = i + 1
    if contours:
        on = outlines > 0
        rgb[on] = colors[outlines[on] - 1]
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def overlay_instances(
    image: np.ndarray,
    masks: np.ndarray,
    ax: Axes | None = None,
    alpha: float = 0.45,
    colors: np.ndarray | None = None,
    contours: bool = True,
    seed: int = 0,
    title: str | None = None,
) -> Axes:
    """Show a gray image with its instances coloured, on ``ax`` (a new Agg figure if ``None``).

    Args:
        image: uint8 ``[H, W]``; masks: bool ``[N, H, W]`` or an int label image.
        ax: matplotlib axes to draw on.
        alpha, colors, contours, seed: see :func:`overlay_rgb`.
        title: axes title.

    Returns:
        the axes (``ax.figure`` is the figure; save it with ``ax.figure.savefig(...)``).
    """
    if ax is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        h, w = np.asarray(image).shape[:2]
        fig = Figure(figsize=(8.0, 8.0 * h / w))
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(overlay_rgb(image, masks, alpha, colors, contours, seed), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    masks: np.ndarray,
    title: str | None = None,
    alpha: float = 0.45,
    contours: bool = True,
    seed: int = 0,
) -> Path:
    """Write the overlay as a PNG of exactly the image's pixel size (``W x H``).

    The title, if any, is drawn inside the image (top left, on a dark box), so the file keeps
    the image's size and pixels map one to one.

    Returns:
        the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = np.asarray(image).shape[:2]
    dpi = 100
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    overlay_instances(image, masks, ax=ax, alpha=alpha, contours=contours, seed=seed)
    if title:
        ax.text(
            0.01 * w,
            0.01 * h,
            title,
            color="white",
            fontsize=10,
            va="top",
            ha="left",
            bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "edgecolor": "none"},
        )
    fig.savefig(path, dpi=dpi)
    return path
