"""Detector augmentations (paper, section 5.3) on ``torchvision.transforms.v2`` and ``tv_tensors``.

:func:`build_transforms` turns the config's ``augment`` section into a :class:`Pipeline`: a
``v2.Compose`` that transforms an image (``tv_tensors.Image``), its instance masks
(``tv_tensors.Mask``) and, for records without masks, its boxes (``tv_tensors.BoundingBoxes``)
consistently. Every random draw (probabilities included) comes from torch's RNG, so a
``torch.manual_seed`` makes a pipeline reproducible.

Config keys (``augment:``; a missing key takes the paper's default below, a nested mapping
only overrides the fields it names, ``null``/``false``/``0`` switches an op off)::

    augment:
      hflip: 0.5                  # probability of a horizontal flip
      vflip: 0.5                  # probability of a vertical flip
      shift_scale_rotate:         # v2.RandomAffine, applied with probability p
        p: 0.5
        shift: 0.0625             # max translation, fraction of width/height
        scale: 0.1                # scale factor drawn from [1 - scale, 1 + scale]
        rotate: 45                # angle drawn from [-rotate, rotate] degrees
        fill: 0                   # gray value of the uncovered image area (masks: 0)
      brightness_contrast:        # v2.ColorJitter (image only), applied with probability p
        p: 0.5
        brightness: 0.2           # factor from [1 - brightness, 1 + brightness]
        contrast: 0.2             # factor from [1 - contrast, 1 + contrast]
      gaussian_blur:              # v2.GaussianBlur (image only), applied with probability p
        p: 0.1
        kernel: 5                 # odd kernel size
        sigma: [0.1, 2.0]         # sigma drawn from this range
      median_blur:                # cv2.medianBlur (image only), applied with probability p
        p: 0.1
        kernel: 5                 # odd kernel size
      resize: null                # [H, W]: resize every image (train and eval) to this size

Order: resize, flips, shift-scale-rotate, brightness/contrast, Gaussian blur, median blur.
Training uses all of them; evaluation (``train=False``) only ``resize`` (an identity pipeline
when no size is configured).

Instance masks travel through the pipeline packed as a few non-overlapping *label layers*
(:func:`masks_to_layers`): an ``int32 [L, H, W]`` ``tv_tensors.Mask`` where instance ``i`` is
the value ``i + 1`` in exactly one layer. Nearest-neighbour warping of a label image equals
warping each binary mask, but costs ``L`` (typically 1-4) planes instead of ``N`` (up to ~500 on
competition images). :func:`layers_to_masks` and :func:`layers_to_boxes` unpack them; boxes of
warped masks are their tight pixel-edge boxes. :func:`apply_transforms` wraps all of this for
callers that hold a plain ``[N, H, W]`` mask stack (e.g. the segmenter's training data).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "DEFAULT_AUGMENT",
    "MedianBlur",
    "Pipeline",
    "Resize",
    "apply_transforms",
    "build_transforms",
    "layers_from_indices",
    "layers_to_boxes",
    "layers_to_masks",
    "masks_to_layers",
]

DEFAULT_AUGMENT: dict[str, Any] = {
    "hflip": 0.5,
    "vflip": 0.5,
    "shift_scale_rotate": {"p": 0.5, "shift": 0.0625, "scale": 0.1, "rotate": 45, "fill": 0},
    "brightness_contrast": {"p": 0.5, "brightness": 0.2, "contrast": 0.2},
    "gaussian_blur": {"p": 0.1, "kernel": 5, "sigma": [0.1, 2.0]},
    "median_blur": {"p": 0.1, "kernel": 5},
    "resize": None,
}
"""The paper's augmentations (section 5.3); the defaults of :func:`build_transforms`."""


def _is_plain_tensor(x: Any) -> bool:
    return type(x) is torch.Tensor


class MedianBlur(v2.Transform):
    """Median blur with OpenCV (``cv2.medianBlur``) on the image only; masks and boxes pass through.

    Works on ``tv_tensors.Image`` (or a plain tensor image) ``[C, H, W]`` of any dtype: non-uint8
    images are blurred in uint8 and converted back. Wrap it in ``v2.RandomApply`` for a
    probability (torch RNG).
    """

    _transformed_types = (tv_tensors.Image, _is_plain_tensor)

    def __init__(self, kernel_size: int = 5) -> None:
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"median blur kernel must be an odd integer >= 3, got {kernel_size}")
        self.kernel_size = int(kernel_size)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        image = inpt.as_subclass(torch.Tensor)
        dtype = image.dtype
        if dtype != torch.uint8:
            image = F.to_dtype(image, torch.uint8, scale=True)
        squeeze = image.ndim == 2
        planes = image[None] if squeeze else image.reshape(-1, *image.shape[-2:])
        out = np.stack([cv2.medianBlur(np.ascontiguousarray(p.numpy()), self.kernel_size) for p in planes])
        result = torch.from_numpy(out)
        result = result[0] if squeeze else result.reshape(image.shape)
        if dtype != torch.uint8:
            result = F.to_dtype(result, dtype, scale=True)
        return tv_tensors.wrap(result, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else result


class Resize(v2.Resize):
    """``v2.Resize`` whose masks use ``NEAREST_EXACT`` (pixel-centre aligned) instead of ``NEAREST``.

    torch's legacy ``nearest`` samples ``floor(x' * scale)``, which shifts masks by up to one
    source pixel towards the origin; ``nearest-exact`` samples pixel centres, so a resized mask's
    tight box is the scaled box rounded to whole pixels.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(inpt, self.size, interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)
        return super().transform(inpt, params)


class Pipeline(v2.Compose):
    """A ``v2.Compose`` that knows whether it moves pixels.

    Attributes:
        geometric: True when some op (flip, affine, resize) can move pixels, i.e. boxes must be
            recomputed from the transformed masks; False for photometric-only or empty pipelines.

    Called like any v2 transform: ``pipeline(image)``, ``pipeline(image, masks)`` or
    ``pipeline({"image": ..., "layers": ...})``; the structure comes back unchanged. An empty
    pipeline returns its inputs.
    """

    def __init__(self, transforms: Sequence[Callable], geometric: bool) -> None:
        super().__init__(list(transforms) or [v2.Identity()])
        self.geometric = geometric


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


def _resize_size(cfg: Mapping[str, Any]) -> list[int] | None:
    size = cfg.get("resize", DEFAULT_AUGMENT["resize"])
    if size is None or size is False:
        return None
    if not isinstance(size, Sequence) or len(size) != 2 or any(int(s) <= 0 for s in size):
        raise ValueError(f"augment.resize must be null or [H, W] with positive sizes, got {size!r}")
    return [int(size[0]), int(size[1])]


def _maybe(transform: v2.Transform, p: float) -> v2.Transform:
    return transform if p >= 1.0 else v2.RandomApply([transform], p=p)


def build_transforms(augment_cfg: Mapping[str, Any] | None, train: bool) -> Pipeline:
    """The augmentation pipeline of a config's ``augment`` section (keys: see the module doc).

    Args:
        augment_cfg: the ``augment`` mapping; ``None`` or ``{}`` means the paper's defaults
            (:data:`DEFAULT_AUGMENT`). Unknown keys raise ``ValueError``.
        train: training pipeline (all ops) or evaluation pipeline (``resize`` only).

    Returns:
        a :class:`Pipeline` (a ``v2.Compose``) for ``tv_tensors`` inputs: ``Image`` uint8
        ``[1, H, W]`` (any dtype/channels work), ``Mask`` (label layers or binary masks),
        ``BoundingBoxes``; plain tensors such as labels pass through untouched. Its
        ``geometric`` attribute says whether boxes must be recomputed.
    """
    cfg = dict(augment_cfg or {})
    unknown = set(cfg) - set(DEFAULT_AUGMENT)
    if unknown:
        raise ValueError(f"augment: unknown key(s) {sorted(unknown)}; expected {sorted(DEFAULT_AUGMENT)}")
    ops: list[v2.Transform] = []
    geometric = False
    size = _resize_size(cfg)
    if size is not None:
        ops.append(Resize(size, antialias=True))
        geometric = True
    if not train:
        return Pipeline(ops, geometric)

    for key, flip in (("hflip", v2.RandomHorizontalFlip), ("vflip", v2.RandomVerticalFlip)):
        p = _probability(cfg, key)
        if p > 0:
            ops.append(flip(p=p))
            geometric = True
    ssr = _section(cfg, "shift_scale_rotate")
    if ssr is not None:
        shift, scale = float(ssr["shift"]), float(ssr["scale"])
        affine = v2.RandomAffine(
            degrees=float(ssr["rotate"]),
            translate=(shift, shift) if shift > 0 else None,
            scale=(1.0 - scale, 1.0 + scale) if scale > 0 else None,
            interpolation=InterpolationMode.BILINEAR,
            fill={tv_tensors.Image: ssr["fill"], tv_tensors.Mask: 0, "others": 0},
        )
        ops.append(_maybe(affine, float(ssr["p"])))
        geometric = True
    bc = _section(cfg, "brightness_contrast")
    if bc is not None:
        jitter = v2.ColorJitter(brightness=float(bc["brightness"]), contrast=float(bc["contrast"]))
        ops.append(_maybe(jitter, float(bc["p"])))
    gb = _section(cfg, "gaussian_blur")
    if gb is not None:
        sigma = gb["sigma"]
        sigma = (float(sigma), float(sigma)) if np.isscalar(sigma) else tuple(float(s) for s in sigma)
        ops.append(_maybe(v2.GaussianBlur(kernel_size=int(gb["kernel"]), sigma=sigma), float(gb["p"])))
    mb = _section(cfg, "median_blur")
    if mb is not None:
        ops.append(_maybe(MedianBlur(int(mb["kernel"])), float(mb["p"])))
    return Pipeline(ops, geometric)


# --- instance masks as label layers ------------------------------------------------------------


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
