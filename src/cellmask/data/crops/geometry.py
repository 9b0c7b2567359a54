"""Crop geometry: aligned-RoIAlign crops of boxes from images and from instance masks.

Boxes are float xyxy in pixel-edge coordinates: pixel ``(row j, column i)`` covers
``[i, i + 1] x [j, j + 1]`` and has its centre at ``(i + 0.5, j + 0.5)`` (a record's tight box of a
mask covering columns ``x0..x1`` is ``[x0, x1 + 1]``). A crop of size ``S`` divides the continuous
box ``[x0, x1] x [y0, y1]`` into ``S x S`` equal cells; cell ``(p, q)`` is centred at
``(x0 + (q + 0.5) (x1 - x0) / S, y0 + (p + 0.5) (y1 - y0) / S)``. That is exactly torchvision's
``roi_align(..., spatial_scale=1, aligned=True)``: ``aligned=True`` shifts the box by half a pixel
so that continuous coordinate ``c`` reads pixel index ``c - 0.5`` (bilinear between pixel centres),
and each cell averages ``sampling_ratio x sampling_ratio`` bilinear samples inside it.
:func:`cellmask.models.paste.paste_masks` inverts this map.

- :func:`crop_rois`: image crops, one ``roi_align`` call for all boxes of a batch of images.
  Outside the image roi_align reads the edge pixel within half a pixel and 0 beyond.
- :func:`crop_masks`: an instance's mask cropped at a box the same way (``>= 0.5`` is the
  target). The mask is taken as 0 outside the image, so a cell touching the image border ends
  exactly at the border. Each instance is rasterised into a small window around its box (never a
  full-image float mask per instance) and all windows go through one ``roi_align`` call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torchvision.ops import roi_align

from cellmask.data.datasets import instance_indices
from cellmask.data.records import ImageRecord

__all__ = ["Pixels", "crop_masks", "crop_rois", "instance_pixels", "tight_boxes", "window_groups"]

Pixels = tuple[np.ndarray, np.ndarray]
"""An instance as the ``(rows, cols)`` int64 arrays of its pixels."""

WINDOW_BUDGET = 1 << 22
"""Max pixels of one padded batch of per-instance windows (``crop_masks``), ~16 MB of float32."""


def crop_rois(
    images: torch.Tensor,
    boxes: Sequence[torch.Tensor] | torch.Tensor,
    size: int = 128,
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """Crop every box of every image to ``size x size`` with aligned RoIAlign (one call).

    Args:
        images: float ``[B, C, H, W]`` (or ``[C, H, W]`` for one image).
        boxes: ``B`` float tensors ``[K_i, 4]`` xyxy pixel-edge boxes, one per image; a single
            ``[K, 4]`` tensor when ``B == 1``; or ``[K, 5]`` rois ``(batch index, x0, y0, x1, y1)``.
        size: output side ``S``.
        sampling_ratio: bilinear samples per cell side (each cell averages ``r x r`` of them).

    Returns:
        float ``[sum K_i, C, S, S]`` in the order of the boxes.
    """
    if images.ndim == 3:
        images = images[None]
    if isinstance(boxes, torch.Tensor):
        if boxes.ndim == 2 and boxes.shape[1] == 4:
            if images.shape[0] != 1:
                raise ValueError(f"{images.shape[0]} images need a list of box tensors, got one tensor")
            boxes = [boxes]
        elif not (boxes.ndim == 2 and boxes.shape[1] == 5):
            raise ValueError(f"boxes must be [K, 4] or [K, 5] rois, got shape {tuple(boxes.shape)}")
    if isinstance(boxes, list | tuple):
        if len(boxes) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(boxes)} box tensors")
        boxes = [b.to(images.device, images.dtype).reshape(-1, 4) for b in boxes]
    else:
        boxes = boxes.to(images.device, images.dtype)
    return roi_align(
        images,
        boxes,
        output_size=(size, size),
        spatial_scale=1.0,
        sampling_ratio=sampling_ratio,
        aligned=True,
    )


def window_groups(cost: torch.Tensor, budget: int) -> Iterator[torch.Tensor]:
    """Indices in groups of similar window size, each group's padded size within ``budget``.

    ``cost[i]`` is ``(h_i, w_i)``; items are sorted by area so padding to the group's largest
    window wastes little; a single window larger than the budget forms its own group.
    """
    areas = cost[:, 0] * cost[:, 1]
    order = torch.argsort(areas, stable=True).tolist()
    hw = cost.tolist()
    group: list[int] = []
    gh = gw = 0
    for i in order:
        h, w = hw[i]
        nh, nw = max(gh, h), max(gw, w)
        if group and nh * nw * (len(group) + 1) > budget:
            yield torch.tensor(group, dtype=torch.long)
            group, nh, nw = [], h, w
        group.append(i)
        gh, gw = nh, nw
    if group:
        yield torch.tensor(group, dtype=torch.long)


def crop_masks(
    masks: Sequence[Pixels] | torch.Tensor | np.ndarray,
    boxes: torch.Tensor,
    size: int = 128,
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """Crop instance ``i``'s mask at ``boxes[i]`` exactly as :func:`crop_rois` crops the image.

    The mask counts as 0 outside the image. Only a window around each box (its roi_align support
    plus a pixel of margin) is rasterised, and all windows go through one ``roi_align`` call per
    group of similar size, so a few hundred instances of a 520x704 image cost a few MB.

    Args:
        masks: per instance its ``(rows, cols)`` pixel arrays (see :func:`instance_pixels`), or a
            dense bool/0-1 ``[K, H, W]`` stack.
        boxes: float ``[K, 4]`` xyxy pixel-edge boxes (any, e.g. jittered; may leave the image).
        size, sampling_ratio: as in :func:`crop_rois`.

    Returns:
        float32 ``[K, 1, S, S]`` in ``0..1`` (soft; threshold at 0.5 for a binary target).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).cpu()
    if isinstance(masks, np.ndarray | torch.Tensor):
        dense = torch.as_tensor(masks)
        if dense.ndim != 3 or len(dense) != len(boxes):
            raise ValueError(f"masks must be [K, H, W] with K = {len(boxes)}, got {tuple(dense.shape)}")
        idx, ys, xs = torch.nonzero(dense.cpu(), as_tuple=True)
    else:
        if len(masks) != len(boxes):
            raise ValueError(f"{len(masks)} masks but {len(boxes)} boxes")
        counts = [len(p[0]) for p in masks]
        idx = torch.repeat_interleave(torch.arange(len(masks)), torch.tensor(counts, dtype=torch.long))
        ys = torch.from_numpy(np.concatenate([np.asarray(p[0], dtype=np.int64) for p in masks] or [[]]))
        xs = torch.from_numpy(np.concatenate([np.asarray(p[1], dtype=np.int64) for p in masks] or [[]]))
        ys, xs = ys.long(), xs.long()
    k = len(boxes)
    out = torch.zeros((k, 1, size, size), dtype=torch.float32)
    if k == 0:
        return out
    # The window holds every pixel a bilinear sample of the box can touch, plus one of margin on
    # each side, so roi_align never reaches the window's edge (no clamping there).
    wx0 = torch.floor(boxes[:, 0] - 0.5).long() - 1
    wy0 = torch.floor(boxes[:, 1] - 0.5).long() - 1
    ww = torch.floor(boxes[:, 2] - 0.5).long() + 3 - wx0
    wh = torch.floor(boxes[:, 3] - 0.5).long() + 3 - wy0
    ww, wh = ww.clamp(min=1), wh.clamp(min=1)
    # pixels per instance, sorted by instance (nonzero / concatenation order already is)
    for group in window_groups(torch.stack([wh, ww], 1), WINDOW_BUDGET):
        gh, gw = int(wh[group].max()), int(ww[group].max())
        canvas = torch.zeros((len(group), 1, gh, gw), dtype=torch.float32)
        slot = torch.full((k,), -1, dtype=torch.long)
        slot[group] = torch.arange(len(group))
        s = slot[idx]
        sel = s >= 0
        gi, py, px = s[sel], ys[sel] - wy0[idx[sel]], xs[sel] - wx0[idx[sel]]
        inside = (py >= 0) & (px >= 0) & (py < wh[idx[sel]]) & (px < ww[idx[sel]])
        canvas[gi[inside], 0, py[inside], px[inside]] = 1.0
        local = boxes[group] - torch.stack([wx0, wy0, wx0, wy0], 1)[group].float()
        rois = torch.cat([torch.arange(len(group), dtype=torch.float32)[:, None], local], 1)
        out[group] = crop_rois(canvas, rois, size, sampling_ratio)
    return out


def instance_pixels(record: ImageRecord, i: int) -> Pixels:
    """``(rows, cols)`` int64 arrays of instance ``i``'s pixels (RLE: straight from the runs)."""
    flat = instance_indices(record, i)
    return flat // record.width, flat % record.width


def tight_boxes(pixels: Sequence[Pixels]) -> torch.Tensor:
    """float32 ``[K, 4]`` pixel-edge boxes of instances (``[0, 0, 0, 0]`` for an empty one)."""
    out = torch.zeros((len(pixels), 4), dtype=torch.float32)
    for i, (ys, xs) in enumerate(pixels):
        if len(ys):
            out[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return out
