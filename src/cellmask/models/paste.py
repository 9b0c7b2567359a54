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

Memory, precision and transfers
-------------------------------
The work is done per box on its own pixel window (never a ``K x H x W`` float tensor), in
groups of similar window size whose padded size stays within :data:`PASTE_BUDGET` pixels.
Coordinates and the sampled probabilities are float32 whatever the input dtype, and autocast
is switched off inside (a bfloat16 coordinate is off by up to 2 px at x ~ 700).

The image's window sizes cross to the host once (one ``[K, 2]`` copy), so nothing waits on the
device per box. On a GPU each group's windows are then packed into one flat buffer of all
windows, row-major one after another, by one boolean selection (one wait for its size per
group), and the windows are views of that buffer; on the CPU they are views of their groups'
tensors (no packing needed: there is no device to copy from). :meth:`PastedMasks.to` moves the
offsets in one copy and all windows in another (the write-back of
:mod:`cellmask.predict.pipeline`), :meth:`PastedMasks.areas` is one segment sum.
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
            clipped to the image; possibly ``[0, 0]`` for a box outside the image). From
            :func:`paste_masks` on a GPU they are contiguous views of one flat buffer.
    """

    image_size: tuple[int, int]
    offsets: torch.Tensor
    windows: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.windows)

    def areas(self) -> torch.Tensor:
        """int64 ``[K]`` on the CPU: pixels of each mask (one segment sum, one copy)."""
        if not self.windows:
            return torch.zeros(0, dtype=torch.long)
        flat = _flatten(self.windows)
        sizes = _numels(self.windows).to(flat.device)
        ends = sizes.cumsum(0)
        csum = torch.cat([flat.new_zeros(1, dtype=torch.long), flat.long().cumsum(0)])
        return (csum[ends] - csum[ends - sizes]).cpu()

    def mask(self, i: int) -> torch.Tensor:
        """Mask ``i`` as a bool ``[H, W]`` tensor."""
        out = torch.zeros(self.image_size, dtype=torch.bool, device=self.offsets.device)
        y0, x0 = self.offsets[i].tolist()
        self._put(out, self.windows[i], y0, x0)
        return out

    @staticmethod
    def _put(out: torch.Tensor, win: torch.Tensor, y0: int, x0: int) -> None:
        out[y0 : y0 + win.shape[0], x0 : x0 + win.shape[1]] = win

    def dense(self) -> torch.Tensor:
        """All masks as a bool ``[K, H, W]`` tensor (1 byte per pixel per mask)."""
        out = torch.zeros((len(self), *self.image_size), dtype=torch.bool, device=self.offsets.device)
        for i, (y0, x0) in enumerate(self.offsets.tolist()):
            self._put(out[i], self.windows[i], y0, x0)
        return out

    def to(self, device: torch.device | str) -> PastedMasks:
        """The masks on ``device``: one copy of the offsets and one of all windows (concatenated
        on their own device, split into views on ``device``); ``self``'s tensors where they are
        already there."""
        offsets = self.offsets.to(device)
        windows = self.windows
        moved = offsets is not self.offsets or any(w.device != offsets.device for w in windows)
        if moved and windows:
            if len({w.dtype for w in windows}) > 1:  # not from paste_masks: window by window
                windows = [w.to(offsets.device) for w in windows]
            else:
                flat = _flatten(windows).to(device)
                parts = flat.split([w.numel() for w in windows])
                windows = [p.view(w.shape) for p, w in zip(parts, windows, strict=True)]
        return PastedMasks(self.image_size, offsets, list(windows))


def _flatten(windows: list[torch.Tensor]) -> torch.Tensor:
    """All windows row-major one after another (one concatenation on their device)."""
    return torch.cat([w.reshape(-1) for w in windows])


def _numels(windows: list[torch.Tensor]) -> torch.Tensor:
    """int64 ``[K]`` pixels of each window (from the shapes, no device access)."""
    return torch.tensor([w.numel() for w in windows], dtype=torch.long)


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
        bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)
        bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)
        sizes = torch.stack([hs, ws], 1).cpu()  # the one device -> host copy of the geometry
        groups, shapes = _plan_windows(sizes)
        numels = [h * w for h, w in shapes]
        pack = _pack_windows(device)
        # packed: every window row-major, one after another in the order of the groups
        flat = torch.empty(sum(numels) if pack else 0, dtype=torch.bool, device=device)
        windows = [flat[:0].view(0, 0)] * k
        filled = 0
        for group, members, gh, gw in groups:
            g = group.to(device)
            tx = torch.arange(gw, device=device, dtype=torch.float32)
            ty = torch.arange(gh, device=device, dtype=torch.float32)
            gx = 2 * (xs0[g, None] + tx + 0.5 - boxes[g, 0, None]) / bw[g, None] - 1  # [n, gw]
            gy = 2 * (ys0[g, None] + ty + 0.5 - boxes[g, 1, None]) / bh[g, None] - 1  # [n, gh]
            grid = torch.stack([gx[:, None, :].expand(-1, gh, -1), gy[:, :, None].expand(-1, -1, gw)], dim=-1)
            vals = F.grid_sample(
                probs[g].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
            )[:, 0]
            del grid
            valid = (ty[None, :, None] < hs[g, None, None]) & (tx[None, None, :] < ws[g, None, None])
            keep = (vals >= threshold) & valid
            n_keep = keep.flatten(1).sum(1)
            conf[g] = (vals * keep).flatten(1).sum(1) / n_keep.clamp(min=1)
            if pack:  # window j's valid pixels are its h_j x w_j, row-major: one selection
                size = sum(numels[i] for i in members)
                torch.masked_select(keep, valid, out=flat[filled : filled + size])
                for i in members:
                    windows[i] = flat[filled : filled + numels[i]].view(shapes[i])
                    filled += numels[i]
            else:  # views of the group (sizes from the host copy)
                for j, i in enumerate(members):
                    windows[i] = keep[j, : shapes[i][0], : shapes[i][1]]
    pasted = PastedMasks((height, width), torch.stack([ys0, xs0], 1), windows)
    return (pasted.dense() if dense else pasted), conf


def _pack_windows(device: torch.device) -> bool:
    """Whether :func:`paste_masks` packs the windows into one buffer: off the CPU, where
    :meth:`PastedMasks.to` then moves them in one copy. On the CPU views of the groups cost
    nothing, while the packing selection costs about what the sampling does
    (``benchmarks/bench_hot_paths.py``: 2000 boxes, 59 ms as views, 105 ms packed)."""
    return device.type != "cpu"


def _plan_windows(
    sizes: torch.Tensor,
) -> tuple[list[tuple[torch.Tensor, list[int], int, int]], list[tuple[int, int]]]:
    """The groups of :func:`paste_masks` and the shape of each box's window, from the CPU.

    Args:
        sizes: int64 ``[K, 2]`` ``(h, w)`` of the boxes' pixel spans (CPU).

    Returns:
        ``(groups, shapes)``: ``(indices int64 [n], the same as a list, padded height, padded
        width)`` of each group with pixels to sample, and per box its window's ``(h, w)``:
        ``(0, 0)`` for a box of a group without any pixel (nothing sampled there), else its span.
    """
    hw = sizes.tolist()
    shapes = [(0, 0)] * len(hw)
    groups = []
    for group in window_groups(sizes.clamp(min=1), PASTE_BUDGET):
        members = group.tolist()
        gh, gw = max(hw[i][0] for i in members), max(hw[i][1] for i in members)
        if gh == 0 or gw == 0:
            continue
        groups.append((group, members, gh, gw))
        for i in members:
            shapes[i] = (hw[i][0], hw[i][1])
    return groups, shapes
