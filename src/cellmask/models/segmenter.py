"""The segmentation module: UperNet Swin-T on 128x128 RoIAlign crops of every box.

In MDE-CellMask the masks come from one class-agnostic segmenter, not from the detectors: each
(fused) box is cropped from the full image with RoIAlign to ``S x S`` (128), the segmenter
predicts the cell's binary mask in the crop, and the probabilities are pasted back into the
image at the box.

Model
-----
:class:`Segmenter` wraps segmentation-models-pytorch's ``UPerNet`` (PPM on the last level +
FPN fusion of all four levels, then a 1x1 head upsampled x4 to the crop size) with one output
channel, over timm's Swin-T through smp's timm-universal encoder (``tu-<name>``). smp builds the
timm model with ``features_only=True`` and passes our keyword arguments on, so Swin runs at the
crop size with the same options as the detectors' Swin (:mod:`cellmask.models.backbones`):

- ``img_size = S``: the shifted-window attention masks are precomputed for ``S / 4``;
- ``always_partition=True``: every stage keeps the 7x7 window and its shift and pads its
  feature map to a multiple of 7 (at 128: 32 -> 35, 16 -> 21, 8 -> 14, 4 -> 7), as mmseg's Swin
  does. Parameter shapes therefore never depend on ``S``: ImageNet weights load unchanged and
  a checkpoint trained at one crop size loads at another.

smp's UPerNet applies a LayerNorm to each encoder level (mmseg's Swin output norms) and uses
BatchNorm in its decoder. The paper profile uses 512 decoder channels (mmseg's
``upernet_swin_tiny`` setting; smp's default is 256); mmseg's auxiliary FCN head is not built
(it only adds a training loss). The Swin-T encoder has 27.5 M parameters.

Input: crops float ``[N, 1 or 3, S, S]`` in ``0..1`` (gray is repeated to 3 channels); the
model normalises with ``model.transform.image_mean/std`` (ImageNet, as the detectors).
Output: logits ``[N, 1, S, S]``.

Training (:meth:`Segmenter.training_step`) takes a :class:`cellmask.data.crops.CropDataset`
batch and returns ``{"loss_bce": ..., "loss_dice": ...}`` (weights ``model.loss.bce`` /
``model.loss.dice``; a zero weight drops the term).

Paste geometry
--------------
A crop of box ``[x0, x1] x [y0, y1]`` (pixel-edge coordinates, aligned RoIAlign, see
:mod:`cellmask.data.crops`) has cell ``q`` centred at ``x0 + (q + 0.5) (x1 - x0) / S``.
:func:`paste_masks` maps the ``S`` cells back onto exactly that continuous box: pixel ``j``
(centre ``j + 0.5``) reads the probability map bilinearly at normalised coordinate
``2 (j + 0.5 - x0) / (x1 - x0) - 1``, which is ``F.grid_sample(..., align_corners=False)``'s
convention (-1 and +1 are the outer edges of the first and last cells, so crop-then-paste is
the identity up to resampling). Only pixels whose centres lie inside the box receive a value;
a box too small to contain any pixel centre gets the one pixel holding its centre. The work is
done per box on its own pixel window (never a ``K x H x W`` float tensor), in groups of similar
window size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cellmask.data.crops import crop_rois, window_groups

__all__ = [
    "DEFAULT_SEGMENTER",
    "SEGMENTER_TYPE",
    "PastedMasks",
    "Segmenter",
    "build_segmenter",
    "crop_rois",
    "dice_loss",
    "evaluate_segmenter",
    "instance_ious",
    "is_segmenter_config",
    "paste_masks",
]

SEGMENTER_TYPE = "segmenter"
"""``model.type`` of the segmentation module (it is not a detector: no ``build_detector``)."""

DEFAULT_SEGMENTER: dict[str, Any] = {
    "backbone": {"name": "swin_tiny_patch4_window7_224", "pretrained": True, "kwargs": {}},
    "decoder": {"channels": 512, "norm": "batchnorm"},
    "crop": {"size": 128, "sampling_ratio": 2},
    "transform": {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
    "loss": {"bce": 1.0, "dice": 1.0},
    "predict": {"batch_size": 64, "threshold": 0.5},
}
"""Defaults of the segmenter's ``model`` section (the paper's sizes)."""

PASTE_BUDGET = 1 << 22
"""Max pixels of one padded group of paste windows (a few tens of MB with the sampling grid)."""


def is_segmenter_config(cfg: Mapping[str, Any]) -> bool:
    """True when a full config (or its ``model`` section) describes the segmenter."""
    model = cfg.get("model", cfg)
    return isinstance(model, Mapping) and model.get("type") == SEGMENTER_TYPE


def _section(model_cfg: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {**DEFAULT_SEGMENTER[key], **(model_cfg.get(key) or {})}


# --------------------------------------------------------------------------------------------
# paste


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
        probs: float ``[K, 1, S, S]`` (or ``[K, S, S]``) probabilities of the crops.
        boxes: float ``[K, 4]`` xyxy pixel-edge boxes the crops were made at (aligned RoIAlign).
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


# --------------------------------------------------------------------------------------------
# model


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per instance, averaged: ``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)``."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = targets.float().flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return (1 - dice).mean()


class Segmenter(nn.Module):
    """UperNet (smp) over a timm Swin encoder on ``S x S`` crops; one output channel.

    Build with :func:`build_segmenter`. Attributes: ``net`` (the smp ``UPerNet``; its
    ``encoder``, ``decoder``, ``segmentation_head``), ``crop_size``, ``sampling_ratio``,
    ``loss_weights``, ``batch_size`` and ``threshold`` (predict defaults).
    """

    def __init__(
        self,
        net: nn.Module,
        crop_size: int = 128,
        sampling_ratio: int = 2,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        loss_weights: Mapping[str, float] | None = None,
        batch_size: int = 64,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.net = net
        self.crop_size = int(crop_size)
        self.sampling_ratio = int(sampling_ratio)
        self.register_buffer(
            "image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1), False
        )
        self.register_buffer(
            "image_std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1), False
        )
        self.loss_weights = dict(loss_weights or DEFAULT_SEGMENTER["loss"])
        self.batch_size = int(batch_size)
        self.threshold = float(threshold)

    def class_dependent_prefixes(self) -> list[str]:
        """The class-shaped layer (one class-agnostic output channel: it never changes shape)."""
        return ["net.segmentation_head."]

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Crops float ``[N, 1|3, S, S]`` in 0..1 -> logits ``[N, 1, S, S]``."""
        if crops.shape[1] == 1:
            crops = crops.expand(-1, 3, -1, -1)
        x = (crops - self.image_mean) / self.image_std
        return self.net(x)

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss_bce", "loss_dice"}`` (terms with weight 0 left out)."""
        logits = logits.float()
        targets = targets.to(logits.dtype)
        out: dict[str, torch.Tensor] = {}
        w_bce, w_dice = float(self.loss_weights.get("bce", 0)), float(self.loss_weights.get("dice", 0))
        if w_bce:
            out["loss_bce"] = w_bce * F.binary_cross_entropy_with_logits(logits, targets)
        if w_dice:
            out["loss_dice"] = w_dice * dice_loss(logits, targets)
        if not out:
            raise ValueError("model.loss: both bce and dice weights are 0")
        return out

    def training_step(self, batch: tuple[Sequence[torch.Tensor], Sequence[Mapping[str, Any]]]) -> dict:
        """One step on a :class:`~cellmask.data.crops.CropDataset` batch: losses dict.

        The per-image crop stacks are concatenated. BatchNorm in the decoder's pyramid pooling
        needs two crops per step, so a single crop is duplicated. A batch without any crop (its
        images have no instance) returns zero losses that still reach every parameter (DDP
        expects a gradient for each), without a forward pass (no BatchNorm statistics updated).
        """
        crops_list, targets_list = batch
        crops = [c.reshape(-1, *c.shape[-3:]) for c in crops_list]
        masks = [t["masks"].reshape(-1, 1, *t["masks"].shape[-2:]) for t in targets_list]
        if sum(len(c) for c in crops) == 0:
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            keys = [k for k in ("bce", "dice") if float(self.loss_weights.get(k, 0))]
            return {f"loss_{k}": zero for k in keys}
        crops, masks = torch.cat(crops), torch.cat(masks)
        if len(crops) == 1:
            crops, masks = crops.repeat(2, 1, 1, 1), masks.repeat(2, 1, 1, 1)
        return self.losses(self(crops), masks)

    @torch.no_grad()
    def predict_probs(
        self, images: torch.Tensor, rois: torch.Tensor, batch_size: int | None = None, amp: bool = False
    ) -> torch.Tensor:
        """Probabilities ``[K, 1, S, S]`` of rois ``[K, 5]`` (batch index + box) of ``images``.

        Crops and forwards ``batch_size`` rois at a time (``ceil(K / batch_size)`` forward calls),
        in eval mode (restored afterwards).
        """
        bs = int(batch_size or self.batch_size)
        was_training = self.training
        self.eval()
        try:
            out = torch.empty((len(rois), 1, self.crop_size, self.crop_size), device=images.device)
            for start in range(0, len(rois), bs):
                chunk = rois[start : start + bs]
                crops = crop_rois(images, chunk, self.crop_size, self.sampling_ratio)
                with torch.autocast(images.device.type, enabled=amp and images.device.type == "cuda"):
                    logits = self(crops)
                out[start : start + len(chunk)] = torch.sigmoid(logits.float())
            return out
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict(
        self,
        image: torch.Tensor,
        boxes: torch.Tensor | Sequence[torch.Tensor],
        batch_size: int | None = None,
        threshold: float | None = None,
        dense: bool = True,
        amp: bool = False,
    ) -> tuple[Any, Any]:
        """Masks of ``boxes`` in ``image``: crop, segment (batched), paste, threshold.

        Args:
            image: float ``[C, H, W]`` in 0..1 (``[H, W]`` and uint8 accepted), or a batch
                ``[B, C, H, W]`` with ``boxes`` a list of ``B`` tensors.
            boxes: float ``[K, 4]`` xyxy pixel-edge boxes in ``image``'s coordinates.
            batch_size: crops per forward pass (default ``model.predict.batch_size``); all boxes
                of all images are chunked together.
            threshold: mask threshold on the probability (default ``model.predict.threshold``).
            dense: bool ``[K, H, W]`` masks, or :class:`PastedMasks` windows.
            amp: autocast the forward on CUDA.

        Returns:
            ``(masks, confidences float [K])`` for one image; lists of them for a batch.
        """
        device = self.image_mean.device
        image = torch.as_tensor(image)
        if image.dtype == torch.uint8:
            image = image.float() / 255.0
        batched = image.ndim == 4
        images = image if batched else (image[None, None] if image.ndim == 2 else image[None])
        images = images.to(device, torch.float32)
        box_list = list(boxes) if batched else [torch.as_tensor(boxes)]
        if len(box_list) != len(images):
            raise ValueError(f"{len(images)} images but {len(box_list)} box tensors")
        box_list = [torch.as_tensor(b, dtype=torch.float32, device=device).reshape(-1, 4) for b in box_list]
        rois = torch.cat(
            [
                torch.cat([torch.full((len(b), 1), float(i), device=device), b], 1)
                for i, b in enumerate(box_list)
            ]
        )
        probs = self.predict_probs(images, rois, batch_size, amp)
        thr = self.threshold if threshold is None else float(threshold)
        size = tuple(images.shape[-2:])
        results = []
        start = 0
        for b in box_list:
            results.append(paste_masks(probs[start : start + len(b)], b, size, thr, dense))
            start += len(b)
        if batched:
            return [r[0] for r in results], [r[1] for r in results]
        return results[0]


def build_segmenter(model_cfg: Mapping[str, Any]) -> Segmenter:
    """Build the segmenter of a ``model`` config section (``type: segmenter``).

    Keys (defaults: :data:`DEFAULT_SEGMENTER`): ``backbone {name, pretrained, kwargs,
    weights_file}`` (a timm Swin; ``kwargs`` such as ``embed_dim``/``depths``/``num_heads`` go
    to ``timm.create_model``), ``decoder {channels, norm}``, ``crop {size, sampling_ratio}``,
    ``transform {image_mean, image_std}``, ``loss {bce, dice}``, ``predict {batch_size,
    threshold}``.

    Raises:
        ValueError: another ``type``, or a crop size that is not a multiple of 32.
    """
    import segmentation_models_pytorch as smp

    kind = model_cfg.get("type", SEGMENTER_TYPE)
    if kind != SEGMENTER_TYPE:
        raise ValueError(f"build_segmenter: model.type is {kind!r}, expected {SEGMENTER_TYPE!r}")
    backbone = _section(model_cfg, "backbone")
    decoder = _section(model_cfg, "decoder")
    crop = _section(model_cfg, "crop")
    transform = _section(model_cfg, "transform")
    size = int(crop["size"])
    if size <= 0 or size % 32:
        raise ValueError(f"model.crop.size must be a positive multiple of 32 (Swin's stride), got {size}")
    name = str(backbone["name"])
    kwargs: dict[str, Any] = {}
    if name.startswith("swin"):
        kwargs.update(img_size=size, always_partition=True, strict_img_size=True)
    kwargs.update(backbone.get("kwargs") or {})
    for key in ("depths", "num_heads", "img_size"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    pretrained = bool(backbone.get("pretrained", False))
    if backbone.get("weights_file"):
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(backbone["weights_file"])}
    net = smp.UPerNet(
        encoder_name=f"tu-{name}",
        encoder_weights=True if pretrained else None,
        decoder_channels=int(decoder["channels"]),
        decoder_use_norm=decoder.get("norm", "batchnorm"),
        in_channels=3,
        classes=1,
        **kwargs,
    )
    loss = _section(model_cfg, "loss")
    predict = _section(model_cfg, "predict")
    return Segmenter(
        net,
        crop_size=size,
        sampling_ratio=int(crop["sampling_ratio"]),
        image_mean=[float(v) for v in transform["image_mean"]],
        image_std=[float(v) for v in transform["image_std"]],
        loss_weights={k: float(v or 0) for k, v in loss.items()},
        batch_size=int(predict["batch_size"]),
        threshold=float(predict["threshold"]),
    )


# --------------------------------------------------------------------------------------------
# validation


def instance_ious(pasted: PastedMasks, truth: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """IoU of each pasted mask with its truth instance given as ``(rows, cols)`` pixel arrays."""
    out = np.zeros(len(truth), dtype=np.float64)
    offsets = pasted.offsets.cpu().numpy()
    for i, (ys, xs) in enumerate(truth):
        win = pasted.windows[i].cpu().numpy()
        y0, x0 = offsets[i]
        ly, lx = ys - y0, xs - x0
        inside = (ly >= 0) & (lx >= 0) & (ly < win.shape[0]) & (lx < win.shape[1])
        inter = int(win[ly[inside], lx[inside]].sum())
        union = int(win.sum()) + len(ys) - inter
        out[i] = inter / union if union else 1.0
    return out


def evaluate_segmenter(
    model: Segmenter,
    records: Sequence[Any],
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    max_images: int | None = None,
    amp: bool = False,
) -> dict[str, float]:
    """Mean mask IoU given the truth boxes: each instance's mask is predicted from its tight box,
    pasted, and compared with its truth mask.

    Returns:
        ``{"mIoU": mean over instances, "mIoU_image": mean over images of the per-image mean}``
        (NaN when there is no instance).
    """
    from cellmask.data.crops import instance_pixels, tight_boxes
    from cellmask.data.images import read_image

    if device is not None:
        model.to(device)
    records = list(records)[: max_images if max_images else None]
    all_ious: list[np.ndarray] = []
    for record in records:
        pixels = [instance_pixels(record, i) for i in range(len(record))]
        pixels = [p for p in pixels if len(p[0])]
        if not pixels:
            continue
        image = torch.from_numpy(read_image(record.path, (record.height, record.width)))
        pasted, _ = model.predict(image, tight_boxes(pixels), batch_size=batch_size, dense=False, amp=amp)
        all_ious.append(instance_ious(pasted, pixels))
    if not all_ious:
        return {"mIoU": math.nan, "mIoU_image": math.nan}
    return {
        "mIoU": float(np.concatenate(all_ious).mean()),
        "mIoU_image": float(np.mean([a.mean() for a in all_ious])),
    }
