"""Detector augmentations (paper, section 5.3; values from the authors' albumentations configs).

:func:`build_transforms` turns the config's ``augment`` section into a :class:`Pipeline` of the
ops in :mod:`cellmask.data.augment` (geometric) and :mod:`cellmask.data.photometric`. A
pipeline first draws a :class:`Plan` (every random parameter of one sample, from torch's global
RNG, so ``torch.manual_seed`` or a per-item seed makes it reproducible), then applies it to an
image, its instance masks (``tv_tensors.Mask``: label layers or binary masks) and its boxes
(``tv_tensors.BoundingBoxes``). The plan tells a dataset whether this sample rotates, i.e.
whether it must decode every mask to get tight boxes.

Config keys (``augment:``; a missing key takes the default below, :data:`DEFAULT_AUGMENT`; a
nested mapping only overrides the fields it names; ``null``/``false``/``0`` switches an op off)::

    augment:
      hflip: 0.5                  # probability of a horizontal flip
      vflip: 0.0                  # probability of a vertical flip
      shift_scale_rotate:         # albumentations ShiftScaleRotate (OpenCV warp), probability p
        p: 0.4
        shift: 0.0625             # shift drawn from [-shift, shift] x width/height
        scale: 0.15               # scale factor drawn from [1 - scale, 1 + scale]
        rotate: 15                # angle drawn from [-rotate, rotate] degrees
        border: reflect           # reflect (cv2.BORDER_REFLECT_101) | constant (masks: always 0)
        fill: 0                   # gray value of the uncovered area when border is constant
      brightness_contrast:        # albumentations RandomBrightnessContrast, probability p
        p: 0.5
        brightness: 0.2           # + U(-brightness, brightness) x 255
        contrast: 0.2             # x (1 + U(-contrast, contrast))
      gaussian_blur:              # cv2.GaussianBlur, probability p (one of the two blurs)
        p: 0.2
        kernel: [3, 7]            # odd size drawn uniformly from 3..7; an int is a fixed size
        sigma: 0                  # 0: OpenCV's kernel for the size; [lo, hi]: drawn; x: fixed
      median_blur:                # cv2.medianBlur, probability p (one of the two blurs)
        p: 0.2
        kernel: [3, 7]
      resize: null                # [H, W]: resize every image (train and eval) to this size
      crop: null                  # [H, W]: a random window of this size at native resolution
                                  # (training only; inference sees whole images)

The two blurs are alternatives: one uniform draw picks the Gaussian with probability
``gaussian_blur.p``, the median with ``median_blur.p``, else neither (the two must add up to at
most 1). The authors' ``OneOf([GaussianBlur(blur_limit=7), MedianBlur(blur_limit=7)], p=0.4)``
is therefore exactly ``p: 0.2`` each; two keys keep a profile able to switch one off alone.

Order: resize, crop, flips, shift-scale-rotate, brightness/contrast, blur. Training uses all of
them; evaluation (``train=False``) only ``resize`` (an empty pipeline when no size is configured).
:func:`apply_transforms` wraps all of this for callers that hold a plain ``[N, H, W]`` mask
stack. The label-layer helpers live in :mod:`cellmask.data.layers` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from cellmask.data.augment import Crop, Flip, Op, Resize, ShiftScaleRotate
from cellmask.data.layers import layers_from_indices, layers_to_boxes, layers_to_masks, masks_to_layers
from cellmask.data.photometric import Blur, BlurChoice, BrightnessContrast

__all__ = [
    "DEFAULT_AUGMENT",
    "Pipeline",
    "Plan",
    "apply_transforms",
    "build_transforms",
    "build_type_transforms",
    "layers_from_indices",
    "layers_to_boxes",
    "layers_to_masks",
    "masks_to_layers",
]

DEFAULT_AUGMENT: dict[str, Any] = {
    "hflip": 0.5,
    "vflip": 0.0,
    "shift_scale_rotate": {
        "p": 0.4,
        "shift": 0.0625,
        "scale": 0.15,
        "rotate": 15,
        "border": "reflect",
        "fill": 0,
    },
    "brightness_contrast": {"p": 0.5, "brightness": 0.2, "contrast": 0.2},
    "gaussian_blur": {"p": 0.2, "kernel": [3, 7], "sigma": 0},
    "median_blur": {"p": 0.2, "kernel": [3, 7]},
    "resize": None,
    "crop": None,
    "by_type": None,
}
"""The authors' augmentations (see ``configs/base.yaml``, which states the same values with their
sources); the defaults of :func:`build_transforms`."""


@dataclass(frozen=True)
class Plan:
    """One sample's draws: the ops that apply this time, each with its parameters, in order."""

    steps: tuple[tuple[Op, Any], ...]

    @property
    def geometric(self) -> bool:
        """True when some drawn op moves pixels."""
        return any(op.geometric for op, _ in self.steps)

    @property
    def rotates(self) -> bool:
        """True when some drawn op rotates: tight boxes then need the warped masks."""
        return any(op.rotates(params) for op, params in self.steps)


class Pipeline:
    """A sequence of :class:`~cellmask.data.augment.Op` that draws a :class:`Plan`, then applies it.

    Attributes:
        ops: the ops, in order.
        geometric: True when some op can move pixels (boxes must then be transformed too).

    Called like a torchvision v2 transform, ``pipeline(image)``, ``pipeline(image, masks)`` or
    ``pipeline({"image": ..., "layers": ..., "boxes": ...})``, it draws a plan and applies it:
    the structure comes back unchanged, ``tv_tensors.Image`` (or, without one, the first plain
    tensor) as an image, ``tv_tensors.Mask`` as masks, ``tv_tensors.BoundingBoxes`` as boxes,
    anything else untouched. :meth:`plan` and :meth:`apply` do the two steps separately.
    """

    def __init__(self, ops: Sequence[Op]) -> None:
        self.ops = list(ops)
        self.geometric = any(op.geometric for op in self.ops)

    def plan(self) -> Plan:
        """Draw every op's parameters for one sample (torch's global RNG, in op order)."""
        steps = []
        for op in self.ops:
            params = op.draw()
            if params is not None:
                steps.append((op, params))
        return Plan(tuple(steps))

    def apply(self, inputs: Any, plan: Plan) -> Any:
        """Apply a drawn plan to ``inputs`` (a single item, a tuple/list or a mapping of items)."""
        if isinstance(inputs, Mapping):
            keys, values = list(inputs), list(inputs.values())
        elif isinstance(inputs, (tuple, list)):
            keys, values = None, list(inputs)
        else:
            return _apply_all([inputs], plan)[0]
        out = _apply_all(values, plan)
        if keys is not None:
            return dict(zip(keys, out, strict=True))
        return type(inputs)(out)

    def __call__(self, *inputs: Any) -> Any:
        return self.apply(inputs if len(inputs) > 1 else inputs[0], self.plan())

    def __repr__(self) -> str:
        return f"Pipeline({self.ops!r})"


def _apply_all(values: list[Any], plan: Plan) -> list[Any]:
    has_image = any(isinstance(v, tv_tensors.Image) for v in values)
    plain_image = (
        None if has_image else next((i for i, v in enumerate(values) if type(v) is torch.Tensor), None)
    )
    sizes = [tuple(v.shape[-2:]) for v in values if isinstance(v, (tv_tensors.Image, tv_tensors.Mask))]
    if plain_image is not None:
        sizes.append(tuple(values[plain_image].shape[-2:]))
    sizes += [tuple(v.canvas_size) for v in values if isinstance(v, tv_tensors.BoundingBoxes)]
    out = []
    for i, value in enumerate(values):
        if isinstance(value, tv_tensors.Image) or i == plain_image:
            out.append(_run(value, plan, "image"))
        elif isinstance(value, tv_tensors.Mask):
            out.append(_run(value, plan, "layers"))
        elif isinstance(value, tv_tensors.BoundingBoxes):
            out.append(_run_boxes(value, plan, sizes[0] if sizes else tuple(value.canvas_size)))
        else:
            out.append(value)
    return out


def _run(value: torch.Tensor, plan: Plan, kind: str) -> torch.Tensor:
    """Image or masks ``[..., H, W]`` through the plan (reshaped to ``[C, H, W]`` for the ops)."""
    x = value.as_subclass(torch.Tensor)
    lead = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])
    for op, params in plan.steps:
        x = getattr(op, kind)(x, params)
    x = x.reshape(*lead, *x.shape[-2:])
    return tv_tensors.wrap(x, like=value) if isinstance(value, tv_tensors.TVTensor) else x


def _run_boxes(
    value: tv_tensors.BoundingBoxes, plan: Plan, size: tuple[int, int]
) -> tv_tensors.BoundingBoxes:
    fmt = value.format
    boxes = value.as_subclass(torch.Tensor).reshape(-1, 4)
    if fmt != tv_tensors.BoundingBoxFormat.XYXY:
        boxes = F.convert_bounding_box_format(
            boxes, old_format=fmt, new_format=tv_tensors.BoundingBoxFormat.XYXY
        )
    boxes = boxes.to(torch.float32)
    for op, params in plan.steps:
        if op.geometric:
            boxes = op.boxes(boxes, size, params)
            size = op.out_size(size, params)
    if fmt != tv_tensors.BoundingBoxFormat.XYXY:
        boxes = F.convert_bounding_box_format(
            boxes, old_format=tv_tensors.BoundingBoxFormat.XYXY, new_format=fmt
        )
    return tv_tensors.wrap(boxes.to(value.dtype), like=value, canvas_size=size)


# --- config ----------------------------------------------------------------------------------------


def _section(cfg: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    """A nested section merged over its default; None when switched off."""
    value = cfg.get(key, DEFAULT_AUGMENT[key])
    if value is None or value is False:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"augment.{key} must be a mapping (or null to switch it off), got {value!r}")
    unknown = set(value) - set(DEFAULT_AUGMENT[key])
    if unknown:
        raise ValueError(
            f"augment.{key}: unknown key(s) {sorted(unknown)}; expected {sorted(DEFAULT_AUGMENT[key])}"
        )
    merged = {**DEFAULT_AUGMENT[key], **value}
    p = float(merged["p"])
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augment.{key}.p must be in [0, 1], got {p}")
    return merged if p > 0 else None


def _probability(cfg: Mapping[str, Any], key: str) -> float:
    value = cfg.get(key, DEFAULT_AUGMENT[key])
    p = 0.0 if value is None or value is False else float(value)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augment.{key} must be a probability in [0, 1], got {value!r}")
    return p


def _size(cfg: Mapping[str, Any], key: str) -> tuple[int, int] | None:
    """``augment.<key>`` (``resize``, ``crop``) as ``(H, W)``, or None when switched off."""
    size = cfg.get(key, DEFAULT_AUGMENT[key])
    if size is None or size is False:
        return None
    if not isinstance(size, Sequence) or len(size) != 2 or any(int(s) <= 0 for s in size):
        raise ValueError(f"augment.{key} must be null or [H, W] with positive sizes, got {size!r}")
    return int(size[0]), int(size[1])


def _kernels(key: str, value: Any) -> tuple[int, ...]:
    """``k`` -> ``(k,)``; ``[lo, hi]`` -> the odd sizes ``lo, lo + 2, ..., hi``."""
    bounds = [value, value] if np.isscalar(value) else list(value)
    if len(bounds) != 2 or any(int(b) != b or b < 3 or b % 2 == 0 for b in bounds) or bounds[0] > bounds[1]:
        raise ValueError(
            f"augment.{key}.kernel must be an odd int >= 3 or [lo, hi] of such, lo <= hi; got {value!r}"
        )
    return tuple(range(int(bounds[0]), int(bounds[1]) + 1, 2))


def _sigma(key: str, value: Any) -> tuple[float, float]:
    bounds = [value, value] if np.isscalar(value) else list(value)
    if len(bounds) != 2 or bounds[0] < 0 or bounds[0] > bounds[1]:
        raise ValueError(f"augment.{key}.sigma must be 0, a positive number or [lo, hi]; got {value!r}")
    return float(bounds[0]), float(bounds[1])


def _blur(cfg: Mapping[str, Any]) -> Blur | None:
    gb, mb = _section(cfg, "gaussian_blur"), _section(cfg, "median_blur")
    gaussian = median = None
    if gb is not None:
        gaussian = BlurChoice(
            float(gb["p"]), _kernels("gaussian_blur", gb["kernel"]), _sigma("gaussian_blur", gb["sigma"])
        )
    if mb is not None:
        median = BlurChoice(float(mb["p"]), _kernels("median_blur", mb["kernel"]))
    if gaussian is None and median is None:
        return None
    try:
        return Blur(gaussian, median)
    except ValueError as exc:
        raise ValueError(f"augment.gaussian_blur/median_blur: {exc}") from None


def build_type_transforms(augment_cfg: Mapping[str, Any] | None, train: bool) -> dict[str, Pipeline]:
    """``{cell type: pipeline}`` for the types ``augment.by_type`` names, each of ``augment`` with
    that type's keys merged over it (e.g. ``by_type: {astro: {crop: [384, 384]}}``: larger windows
    for the large astrocytes); ``{}`` without ``by_type``. The other types use
    :func:`build_transforms`'s pipeline.

    Raises:
        ValueError: ``by_type`` is not a mapping of mappings, or a merged section is invalid.
    """
    from cellmask.config import deep_merge

    by_type = (augment_cfg or {}).get("by_type") or {}
    if not isinstance(by_type, Mapping) or not all(isinstance(v, Mapping) for v in by_type.values()):
        raise ValueError(f"augment.by_type must map cell types to augment sections, got {by_type!r}")
    base = {k: v for k, v in (augment_cfg or {}).items() if k != "by_type"}
    return {
        str(kind): build_transforms(deep_merge(base, dict(over)), train) for kind, over in by_type.items()
    }


def build_transforms(augment_cfg: Mapping[str, Any] | None, train: bool) -> Pipeline:
    """The augmentation pipeline of a config's ``augment`` section (keys: see the module doc).

    Args:
        augment_cfg: the ``augment`` mapping; ``None`` or ``{}`` means the defaults
            (:data:`DEFAULT_AUGMENT`). Unknown keys or bad values raise ``ValueError``.
        train: training pipeline (all ops) or evaluation pipeline (``resize`` only).

    Returns:
        a :class:`Pipeline`: call it like a v2 transform, or draw a :meth:`Pipeline.plan` and
        :meth:`Pipeline.apply` it. Its ``geometric`` attribute says whether it can move pixels.
    """
    cfg = dict(augment_cfg or {})
    unknown = set(cfg) - set(DEFAULT_AUGMENT)
    if unknown:
        raise ValueError(f"augment: unknown key(s) {sorted(unknown)}; expected {sorted(DEFAULT_AUGMENT)}")
    cfg.pop("by_type", None)  # per-type pipelines: build_type_transforms
    ops: list[Op] = []
    size = _size(cfg, "resize")
    if size is not None:
        ops.append(Resize(size))
    if not train:
        return Pipeline(ops)
    crop = _size(cfg, "crop")
    if crop is not None:
        ops.append(Crop(crop))
    for key, axis in (("hflip", "horizontal"), ("vflip", "vertical")):
        p = _probability(cfg, key)
        if p > 0:
            ops.append(Flip(axis, p))
    ssr = _section(cfg, "shift_scale_rotate")
    if ssr is not None:
        try:
            ops.append(
                ShiftScaleRotate(**{k: ssr[k] for k in ("p", "shift", "scale", "rotate", "border", "fill")})
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"augment.shift_scale_rotate: {exc}") from None
    bc = _section(cfg, "brightness_contrast")
    if bc is not None:
        ops.append(BrightnessContrast(float(bc["p"]), float(bc["brightness"]), float(bc["contrast"])))
    blur = _blur(cfg)
    if blur is not None:
        ops.append(blur)
    return Pipeline(ops)


def apply_transforms(
    transforms: Callable | None,
    image: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | None = None,
    min_area: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment an image with its instance masks; instances that vanish are dropped.

    Args:
        transforms: a pipeline from :func:`build_transforms` (or any v2 transform), or None.
        image: uint8 ``[H, W]`` gray (or ``[C, H, W]``), numpy or tensor.
        masks: bool/0-1 ``[N, H, W]``.
        labels: ``[N]`` (default: zeros).
        min_area: instances with fewer pixels after the transform are dropped.

    Returns:
        ``(image [C, H', W'] same dtype as given (C = 1 for a 2-D input), masks uint8 [M, H', W'],
        labels int64 [M], boxes float32 [M, 4] tight xyxy pixel-edge boxes of the masks)``.
    """
    img = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if img.ndim == 2:
        img = img[None]
    masks_np = masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    n = len(masks_np)
    labels_t = torch.zeros(n, dtype=torch.int64) if labels is None else torch.as_tensor(labels).long()
    sample: dict[str, Any] = {"image": tv_tensors.Image(img)}
    if n:
        sample["layers"] = tv_tensors.Mask(torch.from_numpy(masks_to_layers(masks_np)))
    if transforms is not None:
        sample = transforms(sample)
    out_image = sample["image"].as_subclass(torch.Tensor)
    if not n:
        h, w = out_image.shape[-2:]
        return out_image, torch.zeros((0, h, w), dtype=torch.uint8), labels_t, torch.zeros((0, 4))
    boxes, areas = layers_to_boxes(sample["layers"], n)
    keep = areas >= max(min_area, 1)
    masks_out = layers_to_masks(sample["layers"], n)
    return out_image, masks_out[keep], labels_t[keep], boxes[keep]
