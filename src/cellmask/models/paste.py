"""Paste crop probabilities back into an image: the inverse of the aligned-RoIAlign crop.

Every mask of the project that is predicted on a box crop and pasted into its image goes
through :func:`paste_masks`: the segmentation module's (:meth:`cellmask.models.segmenter.Segmenter.predict`)
and the Cascade Mask R-CNN baseline's. The result is a :class:`PastedMasks` (per-box windows)
or, on request, a dense bool ``[K, H, W]`` stack.

Geometry
--------
Boxes are float xyxy in pixel-edge coordinates (a mask over columns ``x0..x1`` has box edges
``x0`` and ``x1 + 1``). A crop of box ``[x0, x1] x [y0, y1]`` of size ``S`` (aligned RoIAlign,
see :mod:`cellmask.data.crops`) has cell ``q`` centred at ``x0 + (q + 0.5) (x1 - x0) / S``.
:func:`paste_masks` maps the ``S`` cells back onto exactly that continuous box: pixel ``j``
(centre ``j + 0.5``) reads the probability map bilinearly at normalised coordinate
``2 (j + 0.5 - x0) / (x1 - x0) - 1``, which is ``F.grid_sample(..., align_corners=False)``'s
convention (-1 and +1 are the outer edges of the first and last cells, so crop-then-paste is
the identity up to resampling). Only pixels whose centres lie inside the box receive a value;
a box too small to contain any pixel centre gets the one pixel holding its centre.

Memory and precision
--------------------
The work is done per box on its own pixel window (never a ``K x H x W`` float tensor), in
groups of similar window size whose padded size stays within :data:`PASTE_BUDGET` pixels.
Coordinates and the sampled probabilities are float32 whatever the input dtype, and autocast
is switched off inside (a bfloat16 coordinate is off by up to 2 px at x ~ 700).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cellmask.data.crops import window_groups

__all__ = ["PASTE_BUDGET", "PastedMasks", "paste_masks"]

PASTE_BUDGET = 1 << 22
"""Max pixels of one padded group of paste windows (a few tens of MB with the sampling grid)."""


@dataclass
class PastedMasks:
    """Binary masks of ``K`` boxes stored as per-box windows (memory-friendly form).

    Attributes:
        image_size: ``(H, W)`` of the image the masks belong to.
        offsets: int64 ``[K, 2]``, ``(row, col)`` of each window's top-left pixel.
        windows: ``K`` bool tensors ``[h_i, w_i]`` (the pixels whose centres lie in box ``i``,
            clipped to the image; possibly ``[0, 0]`` for a box outside the image).
    """

    image_size: tuple[int, int]
    offsets: torch.Tensor
    windows: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.windows)

    def areas(self) -> torch.Tensor:
        """int64 ``[K]``: pixels of each mask."""
        return torch.tensor([int(w.sum()) for w in self.windows], dtype=torch.long)

    def mask(self, i: int) -> torch.Tensor:
        """Mask ``i`` as a bool ``[H, W]`` tensor."""
        out = torch.zeros(self.image_size, dtype=torch.bool, device=self.offsets.device)
        self._put(out, i)
        return out

    def _put(self, out: torch.Tensor, i: int) -> None:
        y0, x0 = (int(v) for v in self.offsets[i])
        win = self.windows[i]
        out[y0 : y0 + win.shape[0], x0 : x0 + win.shape[1]] = win

    def dense(self) -> torch.Tensor:
        """All masks as a bool ``[K, H, W]`` tensor (1 byte per pixel per mask)."""
        out = torch.zeros((len(self), *self.image_size), dtype=torch.bool, device=self.offsets.device)
        for i in range(len(self)):
            self._put(out[i], i)
        return out

    def to(self, device: torch.device | str) -> PastedMasks:
        return PastedMasks(self.image_size, self.offsets.to(device), [w.to(device) for w in self.windows])


def _pixel_span(lo: torch.Tensor, hi: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[start, stop)`` of the pixels whose centres lie in ``[lo, hi]``, clipped to ``[0, limit)``.

    A box containing no pixel centre gets the pixel that holds its centre.
    """
    start = torch.ceil(lo - 0.5).long()
    stop = torch.floor(hi - 0.5).long() + 1
    empty = stop <= start
    centre = torch.floor((lo + hi) / 2).long()
    start = torch.where(empty, centre, start)
    stop = torch.where(empty, centre + 1, stop)
    return start.clamp(0, limit), stop.clamp(0, limit)


def paste_masks(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
    dense: bool = True,
) -> tuple[torch.Tensor | PastedMasks, torch.Tensor]:
    """Paste crop probabilities back into the image at their boxes and threshold them.

    Args:
        probs: ``[K, 1, S, S]`` (or ``[K, S, S]``) probabilities of the crops, any float dtype
            (sampled in float32).
        boxes: float ``[K, 4]`` xyxy pixel-edge boxes the crops were made at (aligned RoIAlign),
            in pixels of the image; taken as float32.
        image_size: ``(H, W)``.
        threshold: a pixel belongs to the mask where its probability is ``>= threshold``.
        dense: return a bool ``[K, H, W]`` tensor; otherwise a :class:`PastedMasks`.

    Returns:
        ``(masks, confidences)``: masks on ``probs``' device; confidences float32 ``[K]``, the
        mean probability of each mask's pixels (0 for an empty mask), for re-scoring.
    """
    if probs.ndim == 3:
        probs = probs[:, None]
    height, width = (int(s) for s in image_size)
    device = probs.device
    boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4)
    k = len(boxes)
    if len(probs) != k:
        raise ValueError(f"{len(probs)} probability maps but {k} boxes")
    with torch.autocast(device.type, enabled=False):
        xs0, xs1 = _pixel_span(boxes[:, 0], boxes[:, 2], width)
        ys0, ys1 = _pixel_span(boxes[:, 1], boxes[:, 3], height)
        ws, hs = xs1 - xs0, ys1 - ys0
        conf = torch.zeros(k, dtype=torch.float32, device=device)
        windows: list[torch.Tensor] = [torch.zeros((0, 0), dtype=torch.bool, device=device)] * k
        bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)
        bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)
        sizes = torch.stack([hs, ws], 1).clamp(min=1).cpu()
        for group in window_groups(sizes, PASTE_BUDGET):
            g = group.to(device)
            gh, gw = int(hs[g].max()), int(ws[g].max())
            if gh == 0 or gw == 0:
                continue
            tx = torch.arange(gw, device=device, dtype=torch.float32)
            ty = torch.arange(gh, device=device, dtype=torch.float32)
            gx = 2 * (xs0[g, None] + tx + 0.5 - boxes[g, 0, None]) / bw[g, None] - 1  # [n, gw]
            gy = 2 * (ys0[g, None] + ty + 0.5 - boxes[g, 1, None]) / bh[g, None] - 1  # [n, gh]
            grid = torch.stack([gx[:, None, :].expand(-1, gh, -1), gy[:, :, None].expand(-1, -1, gw)], dim=-1)
            vals = F.grid_sample(
                probs[g].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
            )[:, 0]
            valid = (ty[None, :, None] < hs[g, None, None]) & (tx[None, None, :] < ws[g, None, None])
            keep = (vals >= threshold) & valid
            n_keep = keep.flatten(1).sum(1)
            conf[g] = (vals * keep).flatten(1).sum(1) / n_keep.clamp(min=1)
            for j, i in enumerate(group.tolist()):
                windows[i] = keep[j, : int(hs[i]), : int(ws[i])]
    pasted = PastedMasks((height, width), torch.stack([ys0, xs0], 1), windows)
    return (pasted.dense() if dense else pasted), conf
