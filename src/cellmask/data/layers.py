"""Instance masks as a few non-overlapping *label layers*.

An ``int32 [L, H, W]`` array where instance ``i`` is the value ``i + 1`` in exactly one layer.
Nearest-neighbour warping of a label image equals warping each binary mask, but costs ``L``
(typically 1-4) planes instead of ``N`` (up to ~500 on competition images, 1000+ on LIVECell).
:func:`layers_from_indices` / :func:`masks_to_layers` pack, :func:`layers_to_masks` and
:func:`layers_to_boxes` unpack; boxes are tight pixel-edge boxes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["layers_from_indices", "layers_to_boxes", "layers_to_masks", "masks_to_layers"]


def layers_from_indices(indices: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Pack instances given as flat row-major pixel indices into non-overlapping label layers.

    Greedy first fit: instance ``i`` becomes value ``i + 1`` in the first layer where none of its
    pixels is taken (overlapping or duplicated instances go to later layers).

    Returns:
        int32 ``[L, H, W]`` (``L >= 1``; an instance without pixels appears nowhere).
    """
    layers: list[np.ndarray] = [np.zeros(height * width, dtype=np.int32)]
    for i, idx in enumerate(indices):
        if len(idx) == 0:
            continue
        for layer in layers:
            if not layer[idx].any():
                layer[idx] = i + 1
                break
        else:
            layer = np.zeros(height * width, dtype=np.int32)
            layer[idx] = i + 1
            layers.append(layer)
    return np.stack(layers).reshape(len(layers), height, width)


def masks_to_layers(masks: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pack a ``[N, H, W]`` bool/0-1 mask stack into int32 label layers ``[L, H, W]`` (see above)."""
    masks = masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    flat = masks.reshape(len(masks), masks.shape[1] * masks.shape[2])
    return layers_from_indices([np.flatnonzero(m) for m in flat], masks.shape[1], masks.shape[2])


def _layer_pixels(layers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(instance index, y, x)`` of every labelled pixel of the layers (int64 each)."""
    height, width = layers.shape[-2:]
    flat = layers.reshape(-1)
    nz = torch.nonzero(flat, as_tuple=True)[0]
    ids = flat[nz].long() - 1
    pix = nz % (height * width)
    return ids, pix // width, pix % width


def layers_to_boxes(layers: torch.Tensor | np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes and areas of the ``n`` instances packed in label layers.

    Returns:
        ``(boxes float32 [n, 4] xyxy pixel edges, areas int64 [n])``: instance with columns
        ``x0..x1`` and rows ``y0..y1`` gets ``[x0, y0, x1 + 1, y1 + 1]``; an instance without
        pixels gets area 0 and box ``[0, 0, 0, 0]``.
    """
    layers = torch.as_tensor(layers).as_subclass(torch.Tensor)
    ids, ys, xs = _layer_pixels(layers)
    areas = torch.bincount(ids, minlength=n)[:n]
    big = max(layers.shape[-2:]) + 1
    x0 = torch.full((n,), big, dtype=torch.long).scatter_reduce(0, ids, xs, "amin")
    y0 = torch.full((n,), big, dtype=torch.long).scatter_reduce(0, ids, ys, "amin")
    x1 = torch.full((n,), -1, dtype=torch.long).scatter_reduce(0, ids, xs, "amax") + 1
    y1 = torch.full((n,), -1, dtype=torch.long).scatter_reduce(0, ids, ys, "amax") + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.float32)
    boxes[areas == 0] = 0
    return boxes, areas


def layers_to_masks(layers: torch.Tensor | np.ndarray, n: int) -> torch.Tensor:
    """Unpack label layers into a uint8 ``[n, H, W]`` 0/1 mask stack."""
    layers = torch.as_tensor(layers).as_subclass(torch.Tensor)
    ids, ys, xs = _layer_pixels(layers)
    masks = torch.zeros((n, *layers.shape[-2:]), dtype=torch.uint8)
    masks[ids, ys, xs] = 1
    return masks
