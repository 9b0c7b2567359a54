"""Exact tight boxes under an axis-aligned augmentation plan, decoding only the cells that need it.

A plan without rotation (flips, resizing, shift-scale with angle 0) warps masks by separable
nearest-neighbour sampling: output pixel ``(v, u)`` takes source pixel ``(rows[v], cols[u])``
(:func:`plan_index_maps`, the composition of every op's :meth:`~cellmask.data.augment.Op.index_map`).
A cell's warped mask therefore keeps exactly its pixels whose row and column are both sampled.

:class:`SampledBoxes` turns that into boxes. A cell whose box rows and columns are all sampled
(:meth:`SampledBoxes.coverage`) keeps all its pixels, so its warped tight box is its mapped box:
no decoding needed. The others (cells cut by the image border after a shift or scale-up, or
whose extreme row/column a shrink skips) get their exact tight box and area from their pixel
indices (:meth:`SampledBoxes.pixel_boxes`), still without any ``H x W`` array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from cellmask.data.augment import Size

if TYPE_CHECKING:
    from cellmask.data.transforms import Plan

__all__ = ["SampledBoxes", "plan_index_maps"]


def plan_index_maps(plan: Plan, size: Size) -> tuple[np.ndarray, np.ndarray, Size]:
    """Compose the index maps of a non-rotating plan's geometric ops.

    Args:
        plan: a :class:`cellmask.data.transforms.Plan` that does not rotate.
        size: the input ``(H, W)``.

    Returns:
        ``(rows int64 [H_out], cols int64 [W_out], (H_out, W_out))``: the input row/column each
        output row/column samples, -1 where none.
    """
    rows, cols = np.arange(size[0]), np.arange(size[1])
    for op, params in plan.steps:
        if not op.geometric:
            continue
        r, c = op.index_map(size, params)
        rows = np.where(r >= 0, rows[np.maximum(r, 0)], -1)
        cols = np.where(c >= 0, cols[np.maximum(c, 0)], -1)
        size = op.out_size(size, params)
    return rows, cols, size


class _Axis:
    """Per source pixel of one axis: how often it is sampled, and its first/last output pixel."""

    def __init__(self, index: np.ndarray, n_src: int) -> None:
        out = np.flatnonzero(index >= 0)
        src = index[out]
        self.count = np.bincount(src, minlength=n_src)
        self.first = np.full(n_src, len(index), dtype=np.int64)
        np.minimum.at(self.first, src, out)
        self.last = np.full(n_src, -1, dtype=np.int64)
        np.maximum.at(self.last, src, out)
        self.sampled_before = np.concatenate([[0], np.cumsum(self.count > 0)])  # prefix counts
        self.n_src = n_src

    def sampled(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(number of sampled source pixels in [floor(lo), ceil(hi)), that range's length)``."""
        a = np.clip(np.floor(lo), 0, self.n_src).astype(np.int64)
        b = np.clip(np.ceil(hi), 0, self.n_src).astype(np.int64)
        return self.sampled_before[b] - self.sampled_before[a], np.maximum(b - a, 0)


class SampledBoxes:
    """Tight boxes of instances under a non-rotating plan (see the module doc).

    Args:
        plan: a non-rotating :class:`cellmask.data.transforms.Plan`.
        size: the source image ``(H, W)``.
    """

    def __init__(self, plan: Plan, size: Size) -> None:
        rows, cols, self.out_size = plan_index_maps(plan, size)
        self.size = (int(size[0]), int(size[1]))
        self.rows, self.cols = _Axis(rows, size[0]), _Axis(cols, size[1])

    def coverage(self, boxes: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(covered, hidden)``, bool ``[N]`` each, for xyxy pixel-edge boxes.

        ``covered``: every source row and column of the box is sampled, so a mask-tight box maps
        onto its warped tight box exactly. ``hidden``: no row or no column of it is sampled,
        so the instance vanishes. Only the rest need their pixels (:meth:`pixel_boxes`).
        """
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        (nx, lx), (ny, ly) = self.cols.sampled(b[:, 0], b[:, 2]), self.rows.sampled(b[:, 1], b[:, 3])
        return (nx == lx) & (ny == ly) & (lx > 0) & (ly > 0), (nx == 0) | (ny == 0)

    def pixel_boxes(self, indices: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact warped tight boxes and areas of instances given by their source pixels.

        Args:
            indices: per instance, flat row-major pixel indices into the source ``H x W``.

        Returns:
            ``(boxes float32 [K, 4] xyxy pixel edges in the output image, areas int64 [K])``;
            an instance with no sampled pixel gets area 0 and box ``[0, 0, 0, 0]``.
        """
        boxes = torch.zeros((len(indices), 4), dtype=torch.float32)
        areas = torch.zeros(len(indices), dtype=torch.int64)
        width = self.size[1]
        for k, idx in enumerate(indices):
            ys, xs = np.divmod(np.asarray(idx, dtype=np.int64), width)
            cy, cx = self.rows.count[ys], self.cols.count[xs]
            seen = (cy > 0) & (cx > 0)
            if not seen.any():
                continue
            ys, xs = ys[seen], xs[seen]
            areas[k] = int((cy[seen] * cx[seen]).sum())
            x0, x1 = self.cols.first[xs].min(), self.cols.last[xs].max() + 1
            y0, y1 = self.rows.first[ys].min(), self.rows.last[ys].max() + 1
            boxes[k] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
        return boxes, areas
