"""The Cascade Mask R-CNN baseline's mask branch: targets from windows, loss, config -> modules.

Targets (:func:`roi_mask_targets`): the mask head predicts ``M x M`` (28) logits per RoI; its
target is the matched truth mask resampled onto the RoI with *aligned* RoIAlign in the
pixel-edge convention (cell ``(p, q)`` of box ``[x0, x1] x [y0, y1]`` is centred at
``x0 + (q + 0.5) (x1 - x0) / M``; :func:`cellmask.data.crops.crop_rois`): the fraction of each
cell the mask covers, in [0, 1] (torchvision's soft targets; mmdet thresholds them at 0.5).
Kept soft because pasting a soft map back reproduces the truth more closely: on the six real
fixture images, encoding every truth mask at its own box and pasting it back gives a mean IoU
of 0.996 (0.985 with binarised targets); what is lost is thin astrocyte processes under ~2 px
per 28th of the box. Each RoI reads only a window of its truth mask (the pixels a bilinear
sample of the RoI can touch, plus one of margin; zeros outside the image), so a 1000-cell
LIVECell image never becomes an ``[N, H, W]`` float stack. At inference the probabilities are
pasted back with :func:`cellmask.models.segmenter.paste_masks`, the inverse map
(:class:`cellmask.models.transform.CellRCNNTransform`).

The truth masks come as :class:`cellmask.data.layers.MaskWindows` (each truth cropped to its
own box: what ``DetectionDataset(with_masks=True)`` yields) or, as before, a dense ``[G, H, W]``
stack (cropped to windows first: one ``nonzero``). They move to the RoIs' device in two copies
(windows and their boxes); each group's canvas of RoI windows is gathered from the truth
windows in one indexing operation (the part of a RoI window outside its truth's window is
zero, as it is in a full-image mask), so the targets are bit for bit those of the full-image
masks, with one device -> host copy per image (the RoIs' boxes, which size the canvases) and
none per RoI.

The truth masks stay at the original image's resolution (the transform does not resize them);
RoIs in the resized image's pixels are mapped back by :func:`rois_to_mask_pixels`.

Config (``model.mask``; every key required): ``enabled``, ``pool_size`` (the feature RoIAlign,
14), ``sampling_ratio`` (feature and target RoIAlign), ``layers`` (``MaskRCNNHeads`` conv
widths), ``dilation``, ``dim_reduced`` (the predictor's deconvolution width; logits are
``2 * pool_size``), ``loss_weight``, ``threshold`` (pasted probability -> mask pixel).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from cellmask.data.crops import crop_rois, window_groups
from cellmask.data.layers import MaskWindows
from cellmask.models.roi_heads import FPN_LEVELS
from cellmask.models.sections import section

__all__ = [
    "TARGET_WINDOW_BUDGET",
    "build_mask_branch",
    "mask_image_size",
    "mask_loss",
    "roi_mask_targets",
    "rois_to_mask_pixels",
]

TARGET_WINDOW_BUDGET = 1 << 22
"""Max pixels of one padded group of truth windows in :func:`roi_mask_targets` (16 MB of float32)."""


def rois_to_mask_pixels(rois: Tensor, image_shape: tuple[int, int], mask_shape: tuple[int, int]) -> Tensor:
    """Map float ``[R, 4]`` xyxy RoIs from the resized image (``image_shape`` ``(h, w)``) to the
    pixels of masks of ``mask_shape`` ``(H, W)`` (the exact inverse of the transform's box
    resize: x times ``W / w``, y times ``H / h``)."""
    sy = float(mask_shape[0]) / float(image_shape[0])
    sx = float(mask_shape[1]) / float(image_shape[1])
    return rois.float() * rois.new_tensor([sx, sy, sx, sy], dtype=torch.float32)


def mask_image_size(masks: MaskWindows | Tensor) -> tuple[int, int]:
    """``(H, W)`` of truth masks given as :class:`MaskWindows` or a ``[G, H, W]`` stack."""
    if isinstance(masks, MaskWindows):
        return masks.image_size
    return int(masks.shape[-2]), int(masks.shape[-1])


def roi_mask_targets(
    masks: MaskWindows | Tensor, rois: Tensor, matched_idxs: Tensor, size: int, sampling_ratio: int
) -> Tensor:
    """Soft ``size x size`` targets: truth mask ``matched_idxs[i]`` resampled onto ``rois[i]``.

    Args:
        masks: the ``G`` truth masks of one image: :class:`MaskWindows` (any device; moved to
            ``rois``' device) or a uint8/bool ``[G, H, W]`` stack.
        rois: float ``[R, 4]`` xyxy pixel-edge RoIs in the masks' pixels (may leave the image).
        matched_idxs: int64 ``[R]`` indices into the truths (on ``rois``' device).
        size: the target side ``M``.
        sampling_ratio: bilinear samples per target cell side.

    Returns:
        float32 ``[R, M, M]`` in [0, 1] (covered fraction of each cell) on ``rois``' device.
    """
    device = rois.device
    r = rois.shape[0]
    out = torch.zeros((r, size, size), dtype=torch.float32, device=device)
    if r == 0:
        return out
    truth = masks if isinstance(masks, MaskWindows) else MaskWindows.from_dense(masks)
    truth = truth.to(device, non_blocking=True)
    boxes = rois.detach().float().cpu()  # the one device -> host copy: it sizes the canvases
    # the window holds every pixel a bilinear sample of the RoI can touch, plus one of margin
    wx0 = torch.floor(boxes[:, 0] - 0.5).long() - 1
    wy0 = torch.floor(boxes[:, 1] - 0.5).long() - 1
    ww = (torch.floor(boxes[:, 2] - 0.5).long() + 3 - wx0).clamp(min=1)
    wh = (torch.floor(boxes[:, 3] - 0.5).long() + 3 - wy0).clamp(min=1)
    local = boxes - torch.stack([wx0, wy0, wx0, wy0], 1).float()
    hs, ws = wh.tolist(), ww.tolist()
    windows = torch.stack([wx0, wy0, ww, wh], 1).to(device, non_blocking=True)
    # each truth's window on the device: box, start in the flat data, and a trailing zero that
    # every canvas pixel outside its truth's window reads
    matched = matched_idxs.to(device)
    t_boxes, t_starts = truth.boxes[matched], truth.starts()[matched]
    data = torch.cat([truth.data, truth.data.new_zeros(1)])
    outside = len(truth.data)
    for group in window_groups(torch.stack([wh, ww], 1), TARGET_WINDOW_BUDGET):
        members = group.tolist()
        gh, gw = max(hs[i] for i in members), max(ws[i] for i in members)
        g = group.to(device)
        canvas = _gather_canvas(data, outside, windows[g], t_boxes[g], t_starts[g], gh, gw)
        batch_idx = torch.arange(len(group), dtype=torch.float32)[:, None]
        window_rois = torch.cat([batch_idx, local[group]], 1).to(device)
        out[g] = crop_rois(canvas[:, None], window_rois, size, sampling_ratio)[:, 0]
    return out


def _gather_canvas(
    data: Tensor, outside: int, windows: Tensor, t_boxes: Tensor, t_starts: Tensor, gh: int, gw: int
) -> Tensor:
    """float32 ``[n, gh, gw]``: RoI window ``j`` (int64 ``windows[j] = (x0, y0, w, h)`` in image
    pixels) filled with its truth's pixels (int64 ``t_boxes[j]`` xyxy window starting at
    ``t_starts[j]`` in ``data``), zero outside its truth's window and beyond ``(h, w)``.
    ``data[outside]`` is a zero."""
    rows = torch.arange(gh, device=data.device)
    cols = torch.arange(gw, device=data.device)
    x0, y0, w, h = windows.unbind(1)
    ty = y0[:, None] + rows - t_boxes[:, 1, None]  # [n, gh] rows in the truth's window
    tx = x0[:, None] + cols - t_boxes[:, 0, None]  # [n, gw]
    t_h = t_boxes[:, 3] - t_boxes[:, 1]
    t_w = t_boxes[:, 2] - t_boxes[:, 0]
    in_y = (ty >= 0) & (ty < t_h[:, None]) & (rows < h[:, None])
    in_x = (tx >= 0) & (tx < t_w[:, None]) & (cols < w[:, None])
    pos = t_starts[:, None, None] + ty[:, :, None] * t_w[:, None, None] + tx[:, None, :]
    pos.masked_fill_(~(in_y[:, :, None] & in_x[:, None, :]), outside)
    return data[pos].float()


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Binary cross entropy between each RoI's truth-class logits and its target.

    Args:
        mask_logits: ``[R, C, M, M]``; labels: int64 ``[R]`` (> 0); targets: float ``[R, M, M]``.

    Returns:
        a 0-d float32 loss (0, still attached to the graph, when ``R == 0``).
    """
    if labels.numel() == 0:
        return mask_logits.sum() * 0
    logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


def build_mask_branch(model_cfg: Mapping[str, Any], in_channels: int, num_classes: int) -> dict[str, Any]:
    """The mask branch of ``model.mask`` as keyword arguments of the cascade's RoI heads:
    ``mask_roi_pool`` (RoIAlign ``pool_size`` over P2..P5), ``mask_head`` (``MaskRCNNHeads``),
    ``mask_predictor`` (``MaskRCNNPredictor``, ``num_classes`` logits of ``2 * pool_size``),
    ``mask_loss_weight`` and ``mask_sampling_ratio``."""
    mask = section(model_cfg, "mask")
    layers = tuple(int(c) for c in mask["layers"])
    return {
        "mask_roi_pool": MultiScaleRoIAlign(
            FPN_LEVELS, output_size=int(mask["pool_size"]), sampling_ratio=int(mask["sampling_ratio"])
        ),
        "mask_head": MaskRCNNHeads(in_channels, layers, int(mask["dilation"])),
        "mask_predictor": MaskRCNNPredictor(layers[-1], int(mask["dim_reduced"]), num_classes),
        "mask_loss_weight": float(mask["loss_weight"]),
        "mask_sampling_ratio": int(mask["sampling_ratio"]),
    }
