"""Backbones + FPN for the detectors: a timm body (``features_only``) under torchvision's FPN.

:func:`build_backbone` returns a :class:`BackboneWithFPN`: image batch ``[B, 3, H, W]`` in, an
``OrderedDict`` of P2..P6 (keys ``'0', '1', '2', '3', 'pool'``, strides 4, 8, 16, 32, 64, each
with ``out_channels`` channels) out, which is exactly what torchvision's RPN, ``AnchorGenerator``
and ``MultiScaleRoIAlign(['0', '1', '2', '3'])`` expect.

Bodies (``backbone_cfg["name"]``, a timm name with its pretrained tag, so the weights a run
starts from are named in its config):

- ``swin_tiny_patch4_window7_224.ms_in1k`` (Swin-T, branch 1),
- ``resnext101_32x4d.gluon_in1k`` (ResNeXt-101 32x4d, branches 2 and 4 and the baseline),
- ``resnest101e.in1k`` (ResNeSt-101, branch 3),

or any other timm model with stride-4..32 feature levels. ``backbone_cfg["kwargs"]`` goes to
``timm.create_model`` verbatim (reduced demo/smoke variants: ``layers``, ``channels``,
``stem_width`` for the resnets; ``embed_dim``, ``depths``, ``num_heads`` for Swin).

Every builder here takes a complete ``model.backbone`` section
(:data:`cellmask.models.sections.SECTION_KEYS`); the values live in ``configs/base.yaml``.

Swin and the input size
-----------------------
timm's Swin is built for a fixed ``img_size`` by default: the patch embedding asserts the input
size, the shifted-window attention masks are precomputed for it, and a stage smaller than the
window (7) shrinks its window (changing the shape of ``relative_position_bias_table``). The
detector feeds batches whose size varies (``GeneralizedRCNNTransform`` resizes each image by
min/max size and pads the batch to a multiple of 32), so Swin is built with:

- ``strict_img_size=False``: any input size is accepted and the shifted-window masks are built
  for the actual feature size on each forward (timm's ``dynamic_mask``);
- ``always_partition=True``: every stage keeps the 7x7 window and its shift and pads features
  to a multiple of the window, as the original (mmdet) Swin detection backbone does. The
  parameter shapes therefore never depend on the image size: ImageNet weights load unchanged
  and a checkpoint trained at one size (demo) loads at another (paper);
- ``img_size``: the nominal padded size the detector's transform produces (see
  :func:`nominal_input_size`) for a 520x704 image, e.g. 800x1088 at ``min_size=800,
  max_size=1333``, 544x704 at ``520, 704``, 128x160 at ``128, 160``. With the two options
  above it no longer constrains anything; it is kept so the model reports the size it runs at;
- the wrapper pads the input on the bottom/right to a multiple of the patch size (4), so any
  size works stand-alone too (inside the detector the batch is already a multiple of 32).

Swin's features come out NHWC; the wrapper applies one LayerNorm per output level (as mmdet's
Swin does, new parameters) and permutes them to NCHW.

BatchNorm and frozen stages
---------------------------
Every ``BatchNorm2d`` of a body is replaced with torchvision's ``FrozenBatchNorm2d`` (statistics
and affine parameters fixed; standard for detection at batch 2, and it keeps ResNeSt's
split-attention BN from failing on 1x1 inputs at batch 1). ``backbone_cfg["frozen_stages"]``
follows mmdet: ``-1`` trains everything, ``0`` freezes the stem (Swin: patch embedding), ``k``
also freezes the first ``k`` stages. The configs use 1 for the CNNs (mmdet's ResNet detection
configs) and -1 for Swin (Swin's own detection configs freeze nothing).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cellmask.models.sections import OPTIONAL_KEYS, SECTION_KEYS, require, section

__all__ = [
    "KNOWN_BACKBONES",
    "BackboneWithFPN",
    "backbone_param_count",
    "build_backbone",
    "build_body",
    "build_model_backbone",
    "freeze_batch_norm",
    "nominal_input_size",
]

KNOWN_BACKBONES: tuple[str, ...] = (
    "swin_tiny_patch4_window7_224.ms_in1k",
    "resnext101_32x4d.gluon_in1k",
    "resnest101e.in1k",
)
"""The bodies of the paper's detectors with their ImageNet-1k weight tags (any timm model with
stride 4..32 features also works)."""

FEATURE_STRIDES: tuple[int, ...] = (4, 8, 16, 32)
"""Strides of the body levels fed to the FPN (P2..P5; P6 is a max-pool of P5)."""


def _is_swin(name: str) -> bool:
    return name.startswith("swin")


def nominal_input_size(
    min_size: int | Sequence[int],
    max_size: int,
    divisible: int = 32,
    image_hw: tuple[int, int] = (520, 704),
    scale: float | None = None,
) -> tuple[int, int]:
    """The padded ``(H, W)`` the detector's transform makes of a competition-sized image.

    ``scale`` (``model.transform.scale``) set: the image is scaled by exactly that factor and
    ``min_size``/``max_size`` play no part (1.0: 520x704 -> 544x704).

    ``GeneralizedRCNNTransform`` scales an image by ``min(min_size / short side, max_size /
    long side)`` (output size rounded down) and pads the batch to a multiple of ``divisible``.
    For the 520x704 images: ``min_size=520, max_size=704`` gives 544x704, ``800, 1333`` gives
    800x1088, ``128, 160`` gives 128x160. A sequence ``min_size`` (multi-scale training) uses
    its largest value.
    """
    if isinstance(min_size, Sequence):
        min_size = max(int(s) for s in min_size)
    h, w = image_hw
    if scale is None:
        scale = min(float(min_size) / min(h, w), float(max_size) / max(h, w))
    rh, rw = math.floor(h * scale), math.floor(w * scale)
    return math.ceil(rh / divisible) * divisible, math.ceil(rw / divisible) * divisible


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` (and ``SyncBatchNorm``) in ``module`` by ``FrozenBatchNorm2d``.

    Running statistics and affine parameters are copied. Subclasses that do more than normalise
    (timm's ``BatchNormAct2d``) are rejected rather than silently losing their activation.
    Returns the (possibly new) module.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"cannot freeze {type(module).__name__}: only plain BatchNorm2d is supported")
    for name, child in module.named_children():
        new = freeze_batch_norm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def build_body(backbone_cfg: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> nn.Module:
    """The timm ``features_only`` body of a complete ``model.backbone`` section (no FPN, no BN
    replacement).

    Levels are those with strides 4, 8, 16, 32 (``out_indices`` chosen per family, or
    ``backbone_cfg["out_indices"]``). ``backbone_cfg["weights_file"]`` loads ImageNet weights
    from a local file (offline Kaggle kernels) instead of the timm hub.
    """
    import timm

    backbone_cfg = require(
        backbone_cfg, SECTION_KEYS["backbone"], "model.backbone", OPTIONAL_KEYS["backbone"]
    )
    name = backbone_cfg["name"]
    if not name:
        raise ValueError("backbone config needs a 'name' (e.g. one of " + ", ".join(KNOWN_BACKBONES) + ")")
    kwargs: dict[str, Any] = {}
    swin = _is_swin(name)
    if swin:
        kwargs.update(strict_img_size=False, always_partition=True)
        if image_size is not None:
            kwargs["img_size"] = tuple(int(s) for s in image_size)
    kwargs.update(backbone_cfg["kwargs"] or {})
    for key in ("depths", "num_heads", "layers", "channels", "img_size"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])  # YAML gives lists; timm wants tuples in places
    out_indices = backbone_cfg["out_indices"]
    if out_indices is None:
        out_indices = (0, 1, 2, 3) if swin else (1, 2, 3, 4)
    pretrained = bool(backbone_cfg["pretrained"])
    weights_file = backbone_cfg["weights_file"]
    if weights_file:
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file)}
    try:
        body = timm.create_model(
            name, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices), **kwargs
        )
    except RuntimeError as e:
        if pretrained and "size mismatch" in str(e):
            raise ValueError(
                f"backbone {name}: ImageNet weights do not fit the reduced variant {backbone_cfg['kwargs']}; "
                "set pretrained: false for demo/smoke sizes"
            ) from e
        raise
    strides = tuple(body.feature_info.reduction())
    if strides != FEATURE_STRIDES:
        raise ValueError(
            f"backbone {name}: feature strides {strides} (out_indices {out_indices}), expected {FEATURE_STRIDES}"
        )
    return body


def backbone_param_count(backbone_cfg: Mapping[str, Any]) -> int:
    """Parameters of the timm body alone (no FPN, no classifier, no extra output norms).

    Takes a complete ``model.backbone`` section; builds the body with ``pretrained=False``
    (nothing is downloaded).
    """
    cfg = {**backbone_cfg, "pretrained": False, "weights_file": None}
    return sum(p.numel() for p in build_body(cfg).parameters())


class BackboneWithFPN(nn.Module):
    """A timm body + torchvision ``FeaturePyramidNetwork`` with ``LastLevelMaxPool`` (P2..P6).

    Attributes:
        body: the timm ``features_only`` model (BatchNorm frozen).
        fpn: torchvision's FPN; outputs ``'0', '1', '2', '3', 'pool'``.
        out_channels: FPN channels (what torchvision's heads read).
        in_channels_list: channels of the body's four levels.
        frozen_stages: as configured (see module docstring).
        name: the timm model name.
    """

    def __init__(
        self,
        body: nn.Module,
        name: str,
        out_channels: int = 256,
        frozen_stages: int = -1,
        out_norm: bool | None = None,
    ) -> None:
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        super().__init__()
        self.name = name
        self.swin = _is_swin(name)
        self.body = freeze_batch_norm(body)
        self.in_channels_list = list(body.feature_info.channels())
        self.channels_last = str(getattr(body, "output_fmt", "NCHW")).endswith("NHWC")
        # Swin's patch embedding needs H, W divisible by the patch size: pad there, not in callers.
        self.pad_to = int(body.feature_info.reduction()[0]) if self.swin else 1
        if out_norm is None:
            out_norm = self.channels_last
        self.out_norms = (
            nn.ModuleList(nn.LayerNorm(c) for c in self.in_channels_list)
            if out_norm and self.channels_last
            else None
        )
        self.fpn = FeaturePyramidNetwork(self.in_channels_list, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.frozen_stages = frozen_stages
        self._freeze_stages()

    def _stage_groups(self) -> list[list[str]]:
        """Body children grouped as [stem, stage1, stage2, ...] (mmdet's frozen_stages units)."""
        names = [n for n, _ in self.body.named_children()]
        if self.swin:
            stem = [n for n in names if n.startswith("patch_embed")]
            stages = [n for n in names if n.startswith("layers")]
        else:
            stages = [n for n in names if n.startswith("layer")]
            stem = [n for n in names if n not in stages]
        return [stem, *[[s] for s in stages]]

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        groups = self._stage_groups()
        if self.frozen_stages >= len(groups):
            raise ValueError(
                f"frozen_stages={self.frozen_stages}: {self.name} has only {len(groups) - 1} stages"
            )
        for group in groups[: self.frozen_stages + 1]:
            for child in group:
                for p in getattr(self.body, child).parameters():
                    p.requires_grad_(False)
        if self.out_norms is not None:  # mmdet freezes the output norms of frozen stages too
            for i in range(min(self.frozen_stages, len(self.out_norms))):
                for p in self.out_norms[i].parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> BackboneWithFPN:
        super().train(mode)
        if self.frozen_stages >= 0:  # frozen parts stay deterministic (dropout / drop-path off)
            for group in self._stage_groups()[: self.frozen_stages + 1]:
                for child in group:
                    getattr(self.body, child).eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.pad_to, (-w) % self.pad_to
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.body(x)
        if self.channels_last:
            if self.out_norms is not None:
                feats = [norm(f) for norm, f in zip(self.out_norms, feats, strict=True)]
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def build_backbone(
    backbone_cfg: Mapping[str, Any],
    fpn_cfg: Mapping[str, Any],
    image_size: tuple[int, int] | None = None,
) -> BackboneWithFPN:
    """Build body + FPN from the ``model.backbone`` and ``model.fpn`` config sections.

    Args:
        backbone_cfg: the complete ``model.backbone`` section (``name``, ``pretrained``,
            ``frozen_stages``, ``kwargs``, ``out_indices``, ``out_norm``, ``weights_file``).
        fpn_cfg: the ``model.fpn`` section (``out_channels``).
        image_size: nominal padded input ``(H, W)`` (Swin's ``img_size``; see module docstring).
            ``backbone_cfg["kwargs"]["img_size"]`` overrides it.

    Returns:
        :class:`BackboneWithFPN` with ``out_channels``; ``forward`` gives P2..P6 as an
        ``OrderedDict`` keyed ``'0', '1', '2', '3', 'pool'``.

    Raises:
        ValueError: a missing or unknown key (named), an unknown body, bad ``frozen_stages``.
    """
    backbone_cfg = require(
        backbone_cfg, SECTION_KEYS["backbone"], "model.backbone", OPTIONAL_KEYS["backbone"]
    )
    fpn_cfg = require(fpn_cfg, SECTION_KEYS["fpn"], "model.fpn")
    body = build_body(backbone_cfg, image_size)
    return BackboneWithFPN(
        body,
        name=backbone_cfg["name"],
        out_channels=int(fpn_cfg["out_channels"]),
        frozen_stages=int(backbone_cfg["frozen_stages"]),
        out_norm=backbone_cfg["out_norm"],
    )


def build_model_backbone(model_cfg: Mapping[str, Any]) -> BackboneWithFPN:
    """Body + FPN of a ``model`` config section, sized for the nominal input of its transform.

    Reads ``model.backbone``, ``model.fpn`` and ``model.transform`` (``min_size``,
    ``max_size``, ``size_divisible``: Swin's nominal ``img_size``, see the module docstring).
    """
    t = section(model_cfg, "transform")
    min_size = t["min_size"]
    if isinstance(min_size, Sequence):
        min_size = [int(v) for v in min_size]
    scale = None if t["scale"] is None else float(t["scale"])
    image_size = nominal_input_size(min_size, int(t["max_size"]), int(t["size_divisible"]), scale=scale)
    return build_backbone(section(model_cfg, "backbone"), section(model_cfg, "fpn"), image_size)
