"""The segmentation model: UperNet (smp) over timm's Swin-T on ``S x S`` crops, its losses, and
its builder from a config's ``model`` section.

:class:`Segmenter` wraps segmentation-models-pytorch's ``UPerNet`` (PPM on the last level + FPN
fusion of all four levels, then a 1x1 head upsampled x4 to the crop size) with one output
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
(it only adds a training loss). The Swin-T encoder has 27.5 M parameters, the whole model 58.9 M.

Input: crops float ``[N, 1 or 3, S, S]`` in ``0..1`` (gray is repeated to 3 channels); the model
normalises with the config's ``model.transform.image_mean/std`` (ImageNet, as the detectors).
Output: logits ``[N, 1, S, S]``. Training (:meth:`Segmenter.training_step`) takes a
:class:`cellmask.data.crops.CropDataset` batch and returns ``{"loss_bce", "loss_dice"}``;
inference (:meth:`Segmenter.predict`) crops, segments and pastes
(:func:`cellmask.models.paste.paste_masks`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cellmask.data.crops import crop_rois, step_subset
from cellmask.models.paste import paste_masks

__all__ = [
    "SEGMENTER_TYPE",
    "Segmenter",
    "build_segmenter",
    "dice_loss",
    "is_segmenter_config",
]

SEGMENTER_TYPE = "segmenter"
"""``model.type`` of the segmentation module (it is not a detector: no ``build_detector``)."""

SECTIONS: dict[str, tuple[str, ...]] = {
    "backbone": ("name", "pretrained", "kwargs"),
    "decoder": ("channels", "norm"),
    "crop": ("size", "sampling_ratio"),
    "transform": ("image_mean", "image_std"),
    "loss": ("bce", "dice"),
    "predict": ("batch_size", "threshold"),
}
"""The keys :func:`build_segmenter` needs in each section of ``model`` (the numbers live in
``configs/segmenter_upernet_swin_t.yaml``; ``backbone.weights_file`` is optional)."""


def is_segmenter_config(cfg: Mapping[str, Any]) -> bool:
    """True when a full config (or its ``model`` section) describes the segmenter."""
    model = cfg.get("model", cfg)
    return isinstance(model, Mapping) and model.get("type") == SEGMENTER_TYPE


def _section(model_cfg: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``model_cfg[key]`` with every key of :data:`SECTIONS` present, or a ValueError naming it."""
    hint = "build_segmenter takes a complete model section, e.g. load_config('configs/segmenter_upernet_swin_t.yaml')['model']"
    section = model_cfg.get(key)
    if not isinstance(section, Mapping):
        raise ValueError(f"model.{key}: missing section ({hint})")
    for field in SECTIONS[key]:
        if field not in section:
            raise ValueError(f"model.{key}.{field}: missing ({hint})")
    return dict(section)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per instance, averaged: ``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)``.

    ``logits`` and ``targets`` ``[N, ...]``; computed in float32.
    """
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
        *,
        crop_size: int,
        sampling_ratio: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        loss_weights: Mapping[str, float],
        batch_size: int,
        threshold: float,
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
        self.loss_weights = {k: float(v or 0) for k, v in loss_weights.items()}
        if not any(self.loss_weights.get(k) for k in ("bce", "dice")):
            raise ValueError(f"model.loss: both bce and dice weights are 0 ({dict(loss_weights)})")
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
        """``{"loss_bce", "loss_dice"}`` of logits ``[N, 1, S, S]`` against 0/1 targets of the
        same shape, in float32 (terms with weight 0 left out)."""
        logits = logits.float()
        targets = targets.to(logits.dtype)
        out: dict[str, torch.Tensor] = {}
        w_bce, w_dice = self.loss_weights.get("bce", 0.0), self.loss_weights.get("dice", 0.0)
        if w_bce:
            out["loss_bce"] = w_bce * F.binary_cross_entropy_with_logits(logits, targets)
        if w_dice:
            out["loss_dice"] = w_dice * dice_loss(logits, targets)
        return out

    def training_step(self, batch: tuple[Sequence[torch.Tensor], Sequence[Mapping[str, Any]]]) -> dict:
        """One step on a :class:`~cellmask.data.crops.CropDataset` batch: losses dict.

        The per-image crop stacks (``[k_i, 1, S, S]``, targets ``masks`` uint8 of the same shape)
        are concatenated; when the targets carry a step cap (``crops.max_per_step``) that the
        batch exceeds, only the crops :func:`~cellmask.data.crops.step_subset` picks (a uniform
        random subset drawn by the data) go through the network. BatchNorm in the decoder's
        pyramid pooling needs two crops per step, so a single crop is duplicated. A batch without
        any crop (its images have no instance) returns zero losses that still reach every
        parameter (DDP expects a gradient for each), without a forward pass (no BatchNorm
        statistics updated).
        """
        crops_list, targets_list = batch
        crops = [c.reshape(-1, *c.shape[-3:]) for c in crops_list]
        masks = [t["masks"].reshape(-1, 1, *t["masks"].shape[-2:]) for t in targets_list]
        if sum(len(c) for c in crops) == 0:
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return {f"loss_{k}": zero for k in ("bce", "dice") if self.loss_weights.get(k)}
        crops, masks = torch.cat(crops), torch.cat(masks)
        keep = step_subset(targets_list)
        if keep is not None:
            keep = keep.to(crops.device)
            crops, masks = crops[keep], masks[keep]
        if len(crops) == 1:
            crops, masks = crops.repeat(2, 1, 1, 1), masks.repeat(2, 1, 1, 1)
        return self.losses(self(crops), masks)

    @torch.no_grad()
    def predict_probs(
        self,
        images: torch.Tensor,
        rois: torch.Tensor,
        batch_size: int | None = None,
        amp: bool | torch.dtype = False,
    ) -> torch.Tensor:
        """float32 probabilities ``[K, 1, S, S]`` of rois ``[K, 5]`` (batch index + xyxy box) of
        ``images`` float ``[B, C, H, W]``.

        Crops and forwards ``batch_size`` rois at a time (``ceil(K / batch_size)`` forward calls),
        in eval mode (restored afterwards). ``amp`` autocasts the forward on CUDA (a dtype: in it,
        as :func:`cellmask.engine.amp.amp_dtype` chooses for the GPU; ``True``: torch's default);
        an autocast the caller opened applies to the forward too. Either way the probabilities come back as
        float32 (sigmoid of the float32 logits).
        """
        bs = int(batch_size or self.batch_size)
        was_training = self.training
        self.eval()
        device = images.device
        try:
            out = torch.empty(
                (len(rois), 1, self.crop_size, self.crop_size), dtype=torch.float32, device=device
            )
            for start in range(0, len(rois), bs):
                chunk = rois[start : start + bs]
                crops = crop_rois(images, chunk, self.crop_size, self.sampling_ratio)
                use_amp = bool(amp) and device.type == "cuda"
                dtype = amp if isinstance(amp, torch.dtype) else None
                with torch.autocast(device.type, dtype=dtype) if use_amp else contextlib.nullcontext():
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
        amp: bool | torch.dtype = False,
    ) -> tuple[Any, Any]:
        """Masks of ``boxes`` in ``image``: crop, segment (batched), paste, threshold.

        Args:
            image: float ``[C, H, W]`` in 0..1 (``[H, W]`` and uint8 accepted), or a batch
                ``[B, C, H, W]`` with ``boxes`` a list of ``B`` tensors.
            boxes: float ``[K, 4]`` xyxy pixel-edge boxes in ``image``'s coordinates.
            batch_size: crops per forward pass (default ``model.predict.batch_size``); all boxes
                of all images are chunked together.
            threshold: mask threshold on the probability (default ``model.predict.threshold``).
            dense: bool ``[K, H, W]`` masks, or :class:`~cellmask.models.paste.PastedMasks` windows.
            amp: autocast the forward on CUDA. The paste always runs on float32 probabilities
                and float32 boxes, outside autocast.

        Returns:
            ``(masks, confidences float32 [K])`` for one image; lists of them for a batch.
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
        probs = self.predict_probs(images, rois, batch_size, amp).float()
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
    """Build the segmenter of a complete ``model`` config section (``type: segmenter``).

    Sections and keys (all required; values in ``configs/segmenter_upernet_swin_t.yaml``):
    ``backbone {name, pretrained, kwargs[, weights_file]}`` (a timm Swin; ``kwargs`` such as
    ``embed_dim``/``depths``/``num_heads`` go to ``timm.create_model``), ``decoder {channels,
    norm}``, ``crop {size, sampling_ratio}``, ``transform {image_mean, image_std}``, ``loss {bce,
    dice}``, ``predict {batch_size, threshold}``.

    Raises:
        ValueError: another ``type``, a missing section or key (the message names it), a crop
            size that is not a multiple of 32, or both loss weights 0.
    """
    import segmentation_models_pytorch as smp

    kind = model_cfg.get("type", SEGMENTER_TYPE)
    if kind != SEGMENTER_TYPE:
        raise ValueError(f"build_segmenter: model.type is {kind!r}, expected {SEGMENTER_TYPE!r}")
    sections = {key: _section(model_cfg, key) for key in SECTIONS}
    backbone, decoder, crop = sections["backbone"], sections["decoder"], sections["crop"]
    size = int(crop["size"])
    if size <= 0 or size % 32:
        raise ValueError(f"model.crop.size must be a positive multiple of 32 (Swin's stride), got {size}")
    name = str(backbone["name"])
    kwargs: dict[str, Any] = {}
    if name.startswith("swin"):
        kwargs.update(img_size=size, always_partition=True, strict_img_size=True)
    kwargs.update(backbone["kwargs"] or {})
    for key in ("depths", "num_heads", "img_size"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    pretrained = bool(backbone["pretrained"])
    if backbone.get("weights_file"):
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(backbone["weights_file"])}
    net = smp.UPerNet(
        encoder_name=f"tu-{name}",
        encoder_weights=True if pretrained else None,
        decoder_channels=int(decoder["channels"]),
        decoder_use_norm=decoder["norm"],
        in_channels=3,
        classes=1,
        **kwargs,
    )
    transform, predict = sections["transform"], sections["predict"]
    return Segmenter(
        net,
        crop_size=size,
        sampling_ratio=int(crop["sampling_ratio"]),
        image_mean=[float(v) for v in transform["image_mean"]],
        image_std=[float(v) for v in transform["image_std"]],
        loss_weights=sections["loss"],
        batch_size=int(predict["batch_size"]),
        threshold=float(predict["threshold"]),
    )
