"""Instance masks as a few non-overlapping *label layers*, and as per-instance windows.

An ``int32 [L, H, W]`` array where instance ``i`` is the value ``i + 1`` in exactly one layer.
Nearest-neighbour warping of a label image equals warping each binary mask, but costs ``L``
(typically 1-4) planes instead of ``N`` (up to ~500 on competition images, 1000+ on LIVECell).
:func:`layers_from_indices` / :func:`masks_to_layers` pack, :func:`layers_to_masks` and
:func:`layers_to_boxes` unpack; boxes are tight pixel-edge boxes.

:class:`MaskWindows` holds each instance's mask cropped to its own tight box, all windows in
one flat buffer (:func:`layers_to_windows` unpacks layers into it): the mask targets of the
detectors' datasets. A 2000-cell image costs the cells' pixels (about the image's area), where
a full-image ``uint8 [N, H, W]`` stack costs ``N`` images (870 kB per cell at 800x1088).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "MaskWindows",
    "layers_from_indices",
    "layers_to_boxes",
    "layers_to_masks",
    "layers_to_windows",
    "masks_to_layers",
]


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


@dataclass
class MaskWindows:
    """The masks of ``N`` instances of one image, each cropped to its own tight box.

    Attributes:
        image_size: ``(H, W)`` of the image.
        boxes: int64 ``[N, 4]`` xyxy pixel-edge windows ``(x0, y0, x1, y1)``: instance ``i``'s
            pixels lie in rows ``y0..y1-1`` and columns ``x0..x1-1`` (``[0, 0, 0, 0]`` for an
            instance without pixels).
        data: ``[sum_i h_i w_i]`` the windows' pixels, row-major, one window after another in
            instance order (uint8 0/1 from :func:`layers_to_windows`; any dtype).

    Travels like a tensor: :meth:`to` (two copies: ``boxes`` and ``data``) and :meth:`pin_memory`
    (called by a ``DataLoader(pin_memory=True)``).
    """

    image_size: tuple[int, int]
    boxes: torch.Tensor
    data: torch.Tensor

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @classmethod
    def empty(cls, image_size: tuple[int, int], dtype: torch.dtype = torch.uint8) -> MaskWindows:
        """No instance, for an image of ``image_size``."""
        size = (int(image_size[0]), int(image_size[1]))
        return cls(size, torch.zeros((0, 4), dtype=torch.long), torch.zeros(0, dtype=dtype))

    @classmethod
    def from_dense(cls, masks: torch.Tensor) -> MaskWindows:
        """The windows of a ``[N, H, W]`` stack (any dtype; nonzero = in the mask), values kept,
        on the stack's device (one ``nonzero``: one wait on a GPU)."""
        masks = torch.as_tensor(masks)
        if masks.ndim != 3:
            raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
        ids, ys, xs = torch.nonzero(masks, as_tuple=True)
        return _pack(ids, ys, xs, masks[ids, ys, xs], len(masks), (masks.shape[1], masks.shape[2]))

    def sizes(self) -> torch.Tensor:
        """int64 ``[N, 2]`` ``(h, w)`` of each window."""
        return torch.stack([self.boxes[:, 3] - self.boxes[:, 1], self.boxes[:, 2] - self.boxes[:, 0]], 1)

    def starts(self) -> torch.Tensor:
        """int64 ``[N]``: where each window begins in ``data``."""
        numel = self.sizes().prod(1)
        return numel.cumsum(0) - numel

    def window(self, i: int) -> torch.Tensor:
        """Instance ``i``'s window ``[h, w]`` (a view of ``data``; reads its box on the host)."""
        x0, y0, x1, y1 = self.boxes[i].tolist()
        start = int(self.starts()[i])
        return self.data[start : start + (y1 - y0) * (x1 - x0)].view(y1 - y0, x1 - x0)

    def dense(self) -> torch.Tensor:
        """All masks as a ``[N, H, W]`` stack of ``data``'s dtype (tests and small images)."""
        out = torch.zeros((len(self), *self.image_size), dtype=self.data.dtype, device=self.device)
        starts = self.starts().tolist()
        for i, (x0, y0, x1, y1) in enumerate(self.boxes.tolist()):
            h, w = y1 - y0, x1 - x0
            out[i, y0:y1, x0:x1] = self.data[starts[i] : starts[i] + h * w].view(h, w)
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskWindows:
        return MaskWindows(
            self.image_size,
            self.boxes.to(device, non_blocking=non_blocking),
            self.data.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> MaskWindows:
        return MaskWindows(self.image_size, self.boxes.pin_memory(), self.data.pin_memory())


def layers_to_windows(layers: torch.Tensor | np.ndarray, index: torch.Tensor | np.ndarray) -> MaskWindows:
    """The masks of instances ``index`` (distinct, 0-based) packed in label layers, each cropped
    to its own tight box: window ``j`` is instance ``index[j]`` (uint8 0/1).

    Equals ``MaskWindows.from_dense(layers_to_masks(layers, n)[index])`` without the ``[N, H, W]``
    stack: the work and memory are those of the labelled pixels.
    """
    layers = torch.as_tensor(layers).as_subclass(torch.Tensor)
    index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
    ids, ys, xs = _layer_pixels(layers)
    n = max(int(ids.max()) + 1 if len(ids) else 0, int(index.max()) + 1 if len(index) else 0)
    slot = torch.full((n,), -1, dtype=torch.long)
    slot[index] = torch.arange(len(index))
    ids = slot[ids]
    chosen = ids >= 0
    ids, ys, xs = ids[chosen], ys[chosen], xs[chosen]
    ones = torch.ones(len(ids), dtype=torch.uint8)
    return _pack(ids, ys, xs, ones, len(index), (layers.shape[-2], layers.shape[-1]))


def _pack(
    ids: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    values: torch.Tensor,
    n: int,
    image_size: tuple[int, int],
) -> MaskWindows:
    """:class:`MaskWindows` of ``n`` instances from their pixels: int64 ``[P]`` instance ids,
    rows and columns (each pixel once) and ``[P]`` values."""
    device = ids.device
    big = max(image_size) + 1
    x0 = torch.full((n,), big, dtype=torch.long, device=device).scatter_reduce(0, ids, xs, "amin")
    y0 = torch.full((n,), big, dtype=torch.long, device=device).scatter_reduce(0, ids, ys, "amin")
    x1 = torch.full((n,), -1, dtype=torch.long, device=device).scatter_reduce(0, ids, xs, "amax") + 1
    y1 = torch.full((n,), -1, dtype=torch.long, device=device).scatter_reduce(0, ids, ys, "amax") + 1
    boxes = torch.stack([x0, y0, x1, y1], 1)
    boxes[torch.bincount(ids, minlength=n)[:n] == 0] = 0
    h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    numel = h * w
    starts = numel.cumsum(0) - numel
    data = values.new_zeros(int(numel.sum()) if n else 0)
    data[starts[ids] + (ys - y0[ids]) * w[ids] + (xs - x0[ids])] = values
    return MaskWindows((int(image_size[0]), int(image_size[1])), boxes, data)
