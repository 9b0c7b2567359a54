"""Instance crops for the segmentation module: RoIAlign crops of boxes, their mask targets, jitter,
flips and 90-degree rotations, and :class:`CropDataset` (training samples, one image per item).

Geometry
--------
Boxes are float xyxy in pixel-edge coordinates: pixel ``(row j, column i)`` covers
``[i, i + 1] x [j, j + 1]`` and has its centre at ``(i + 0.5, j + 0.5)`` (a record's tight box of a
mask covering columns ``x0..x1`` is ``[x0, x1 + 1]``). A crop of size ``S`` divides the continuous
box ``[x0, x1] x [y0, y1]`` into ``S x S`` equal cells; cell ``(p, q)`` is centred at
``(x0 + (q + 0.5) (x1 - x0) / S, y0 + (p + 0.5) (y1 - y0) / S)``. That is exactly torchvision's
``roi_align(..., spatial_scale=1, aligned=True)``: ``aligned=True`` shifts the box by half a pixel
so that continuous coordinate ``c`` reads pixel index ``c - 0.5`` (bilinear between pixel centres),
and each cell averages ``sampling_ratio x sampling_ratio`` bilinear samples inside it.
:func:`cellmask.models.segmenter.paste_masks` inverts this map.

- :func:`crop_rois`: image crops, one ``roi_align`` call for all boxes of a batch of images.
  Outside the image roi_align reads the edge pixel within half a pixel and 0 beyond.
- :func:`crop_masks`: an instance's mask cropped at a box the same way (``>= 0.5`` is the
  target). The mask is taken as 0 outside the image, so a cell touching the image border ends
  exactly at the border. Each instance is rasterised into a small window around its box (never a
  full-image float mask per instance) and all windows go through one ``roi_align`` call.

Augmentation (training)
-----------------------
:func:`jitter_boxes` scales each side (``scale`` range) and shifts the centre (``shift`` x size)
of every truth box, so the segmenter learns to cope with detector boxes that are a bit off; the
image *and* the target are cropped at the jittered box. :func:`dihedral` / :func:`random_dihedral`
apply horizontal/vertical flips and rotations by multiples of 90 degrees to crops and targets
alike (the paper's segmenter augmentations are flips and rotations).

Dataset design
--------------
:class:`CropDataset` yields one item per *image*: all (or, for training, a random subset of at
most ``max_instances``) of its instances as crops. Reading and decoding an image once per item
and cropping every instance with one ``roi_align`` call is far cheaper than a flat per-instance
dataset that reads an image per cell. An item is::

    (crops float32 [k, 1, S, S] in 0..1 (gray),
     {"masks": uint8 [k, 1, S, S] 0/1, "boxes": float32 [k, 4] (crop boxes, jittered),
      "instances": int64 [k] (indices into the record), "image_id": int (dataset index)})

and :func:`cellmask.data.datasets.collate` batches items into ``(list of crops, list of
targets)``; the segmenter's ``training_step`` concatenates them (``train.batch_size`` images, so
up to ``batch_size x max_instances`` crops per step). Crops are single-channel: the model repeats
gray to 3 channels itself, which keeps worker-to-trainer traffic 3x smaller.

Config (``crops:`` section; defaults in :data:`DEFAULT_CROPS`)::

    crops:
      max_instances: 64        # per image and step (random subset); null: all
      min_area: 4              # instances with fewer mask pixels are not trained on
      jitter: {p: 1.0, scale: [0.8, 1.2], shift: 0.1}   # null: no jitter
      hflip: 0.5
      vflip: 0.5
      rot90: true              # rotate by k x 90 degrees, k uniform in 0..3
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.ops import roi_align

from cellmask.data.datasets import ImageSource, instance_indices
from cellmask.data.records import ImageRecord

__all__ = [
    "DEFAULT_CROPS",
    "CropDataset",
    "crop_config",
    "crop_masks",
    "crop_rois",
    "dihedral",
    "instance_pixels",
    "jitter_boxes",
    "random_dihedral",
    "tight_boxes",
    "window_groups",
]

DEFAULT_CROPS: dict[str, Any] = {
    "max_instances": 64,
    "min_area": 4,
    "jitter": {"p": 1.0, "scale": [0.8, 1.2], "shift": 0.1},
    "hflip": 0.5,
    "vflip": 0.5,
    "rot90": True,
}
"""Defaults of the ``crops`` config section (see the module docstring)."""

Pixels = tuple[np.ndarray, np.ndarray]
"""An instance as the ``(rows, cols)`` int64 arrays of its pixels."""

WINDOW_BUDGET = 1 << 22
"""Max pixels of one padded batch of per-instance windows (``crop_masks``), ~16 MB of float32."""


def crop_config(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``crops`` section over :data:`DEFAULT_CROPS` (``jitter`` merged key by key).

    Raises:
        ValueError: an unknown key, a probability outside [0, 1], or a bad jitter range.
    """
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULT_CROPS)
    if unknown:
        raise ValueError(f"crops: unknown key(s) {sorted(unknown)}; expected {sorted(DEFAULT_CROPS)}")
    out = {**DEFAULT_CROPS, **cfg}
    jitter = out["jitter"]
    if jitter:
        extra = set(jitter) - set(DEFAULT_CROPS["jitter"])
        if extra:
            raise ValueError(f"crops.jitter: unknown key(s) {sorted(extra)}; expected p, scale, shift")
        jitter = {**DEFAULT_CROPS["jitter"], **jitter}
        lo, hi = (float(s) for s in jitter["scale"])
        if not 0 < lo <= hi or float(jitter["shift"]) < 0:
            raise ValueError(f"crops.jitter: need 0 < scale[0] <= scale[1] and shift >= 0, got {jitter}")
    out["jitter"] = jitter or None
    probs = {"hflip": out["hflip"], "vflip": out["vflip"]}
    if out["jitter"]:
        probs["jitter.p"] = out["jitter"]["p"]
    for key, value in probs.items():
        if not 0.0 <= float(value or 0) <= 1.0:
            raise ValueError(f"crops.{key} must be a probability in [0, 1], got {value!r}")
    return out


# --------------------------------------------------------------------------------------------
# crops


def crop_rois(
    images: torch.Tensor,
    boxes: Sequence[torch.Tensor] | torch.Tensor,
    size: int = 128,
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """Crop every box of every image to ``size x size`` with aligned RoIAlign (one call).

    Args:
        images: float ``[B, C, H, W]`` (or ``[C, H, W]`` for one image).
        boxes: ``B`` float tensors ``[K_i, 4]`` xyxy pixel-edge boxes, one per image; a single
            ``[K, 4]`` tensor when ``B == 1``; or ``[K, 5]`` rois ``(batch index, x0, y0, x1, y1)``.
        size: output side ``S``.
        sampling_ratio: bilinear samples per cell side (each cell averages ``r x r`` of them).

    Returns:
        float ``[sum K_i, C, S, S]`` in the order of the boxes.
    """
    if images.ndim == 3:
        images = images[None]
    if isinstance(boxes, torch.Tensor):
        if boxes.ndim == 2 and boxes.shape[1] == 4:
            if images.shape[0] != 1:
                raise ValueError(f"{images.shape[0]} images need a list of box tensors, got one tensor")
            boxes = [boxes]
        elif not (boxes.ndim == 2 and boxes.shape[1] == 5):
            raise ValueError(f"boxes must be [K, 4] or [K, 5] rois, got shape {tuple(boxes.shape)}")
    if isinstance(boxes, list | tuple):
        if len(boxes) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(boxes)} box tensors")
        boxes = [b.to(images.device, images.dtype).reshape(-1, 4) for b in boxes]
    else:
        boxes = boxes.to(images.device, images.dtype)
    return roi_align(
        images,
        boxes,
        output_size=(size, size),
        spatial_scale=1.0,
        sampling_ratio=sampling_ratio,
        aligned=True,
    )


def window_groups(cost: torch.Tensor, budget: int) -> Iterator[torch.Tensor]:
    """Indices in groups of similar window size, each group's padded size within ``budget``.

    ``cost[i]`` is ``(h_i, w_i)``; items are sorted by area so padding to the group's largest
    window wastes little; a single window larger than the budget forms its own group.
    """
    areas = cost[:, 0] * cost[:, 1]
    order = torch.argsort(areas, stable=True).tolist()
    hw = cost.tolist()
    group: list[int] = []
    gh = gw = 0
    for i in order:
        h, w = hw[i]
        nh, nw = max(gh, h), max(gw, w)
        if group and nh * nw * (len(group) + 1) > budget:
            yield torch.tensor(group, dtype=torch.long)
            group, nh, nw = [], h, w
        group.append(i)
        gh, gw = nh, nw
    if group:
        yield torch.tensor(group, dtype=torch.long)


def crop_masks(
    masks: Sequence[Pixels] | torch.Tensor | np.ndarray,
    boxes: torch.Tensor,
    size: int = 128,
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """Crop instance ``i``'s mask at ``boxes[i]`` exactly as :func:`crop_rois` crops the image.

    The mask counts as 0 outside the image. Only a window around each box (its roi_align support
    plus a pixel of margin) is rasterised, and all windows go through one ``roi_align`` call per
    group of similar size, so a few hundred instances of a 520x704 image cost a few MB.

    Args:
        masks: per instance its ``(rows, cols)`` pixel arrays (see :func:`instance_pixels`), or a
            dense bool/0-1 ``[K, H, W]`` stack.
        boxes: float ``[K, 4]`` xyxy pixel-edge boxes (any, e.g. jittered; may leave the image).
        size, sampling_ratio: as in :func:`crop_rois`.

    Returns:
        float32 ``[K, 1, S, S]`` in ``0..1`` (soft; threshold at 0.5 for a binary target).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).cpu()
    if isinstance(masks, np.ndarray | torch.Tensor):
        dense = torch.as_tensor(masks)
        if dense.ndim != 3 or len(dense) != len(boxes):
            raise ValueError(f"masks must be [K, H, W] with K = {len(boxes)}, got {tuple(dense.shape)}")
        idx, ys, xs = torch.nonzero(dense.cpu(), as_tuple=True)
    else:
        if len(masks) != len(boxes):
            raise ValueError(f"{len(masks)} masks but {len(boxes)} boxes")
        counts = [len(p[0]) for p in masks]
        idx = torch.repeat_interleave(torch.arange(len(masks)), torch.tensor(counts, dtype=torch.long))
        ys = torch.from_numpy(np.concatenate([np.asarray(p[0], dtype=np.int64) for p in masks] or [[]]))
        xs = torch.from_numpy(np.concatenate([np.asarray(p[1], dtype=np.int64) for p in masks] or [[]]))
        ys, xs = ys.long(), xs.long()
    k = len(boxes)
    out = torch.zeros((k, 1, size, size), dtype=torch.float32)
    if k == 0:
        return out
    # The window holds every pixel a bilinear sample of the box can touch, plus one of margin on
    # each side, so roi_align never reaches the window's edge (no clamping there).
    wx0 = torch.floor(boxes[:, 0] - 0.5).long() - 1
    wy0 = torch.floor(boxes[:, 1] - 0.5).long() - 1
    ww = torch.floor(boxes[:, 2] - 0.5).long() + 3 - wx0
    wh = torch.floor(boxes[:, 3] - 0.5).long() + 3 - wy0
    ww, wh = ww.clamp(min=1), wh.clamp(min=1)
    # pixels per instance, sorted by instance (nonzero / concatenation order already is)
    for group in window_groups(torch.stack([wh, ww], 1), WINDOW_BUDGET):
        gh, gw = int(wh[group].max()), int(ww[group].max())
        canvas = torch.zeros((len(group), 1, gh, gw), dtype=torch.float32)
        slot = torch.full((k,), -1, dtype=torch.long)
        slot[group] = torch.arange(len(group))
        s = slot[idx]
        sel = s >= 0
        gi, py, px = s[sel], ys[sel] - wy0[idx[sel]], xs[sel] - wx0[idx[sel]]
        inside = (py >= 0) & (px >= 0) & (py < wh[idx[sel]]) & (px < ww[idx[sel]])
        canvas[gi[inside], 0, py[inside], px[inside]] = 1.0
        local = boxes[group] - torch.stack([wx0, wy0, wx0, wy0], 1)[group].float()
        rois = torch.cat([torch.arange(len(group), dtype=torch.float32)[:, None], local], 1)
        out[group] = crop_rois(canvas, rois, size, sampling_ratio)
    return out


# --------------------------------------------------------------------------------------------
# boxes and augmentation


def jitter_boxes(
    boxes: torch.Tensor,
    scale: Sequence[float] = (0.8, 1.2),
    shift: float = 0.1,
    p: float = 1.0,
    image_size: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Randomly rescale and shift boxes (each with probability ``p``).

    Width and height are multiplied by independent factors from ``U(scale[0], scale[1])`` and the
    centre moves by ``U(-shift, shift)`` times the (original) width and height. With
    ``image_size = (H, W)`` the result is clipped to the image, as detector boxes are; a box never
    gets thinner than one pixel.

    Returns:
        float32 ``[K, 4]`` (a new tensor).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    k = len(boxes)
    if k == 0:
        return boxes.clone()
    r = torch.rand((k, 5), generator=generator)
    lo, hi = float(scale[0]), float(scale[1])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    on = r[:, 4] < p
    sw = torch.where(on, lo + (hi - lo) * r[:, 0], 1.0)
    sh = torch.where(on, lo + (hi - lo) * r[:, 1], 1.0)
    dx = torch.where(on, (2 * r[:, 2] - 1) * shift * w, 0.0)
    dy = torch.where(on, (2 * r[:, 3] - 1) * shift * h, 0.0)
    cx, cy, w, h = cx + dx, cy + dy, w * sw, h * sh
    out = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    if image_size is not None:
        height, width = image_size
        out[:, 0::2] = out[:, 0::2].clamp(0, width)
        out[:, 1::2] = out[:, 1::2].clamp(0, height)
        # keep at least one pixel, inside the image
        for a, b, limit in ((0, 2, width), (1, 3, height)):
            thin = out[:, b] - out[:, a] < 1
            mid = ((out[:, a] + out[:, b]) / 2).clamp(0.5, limit - 0.5)
            out[thin, a] = mid[thin] - 0.5
            out[thin, b] = mid[thin] + 0.5
    return out


def dihedral(x: torch.Tensor, k: int = 0, hflip: bool = False, vflip: bool = False) -> torch.Tensor:
    """Flip (horizontal, then vertical) and then rotate by ``k x 90`` degrees counter-clockwise.

    Acts on the last two dimensions (``torch.rot90(x, k, dims=(-2, -1))`` for the rotation).
    """
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    if k % 4:
        x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x


def random_dihedral(
    *tensors: torch.Tensor,
    hflip: float = 0.5,
    vflip: float = 0.5,
    rot90: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """Draw one flip/rotation per instance and apply it to every tensor alike.

    Args:
        tensors: ``[K, ..., S, S]`` tensors (e.g. crops and their targets), same ``K``, square.
        hflip, vflip: flip probabilities; rot90: rotate by ``k x 90``, ``k`` uniform in 0..3.

    Returns:
        the transformed tensors (new tensors; the inputs are untouched).
    """
    k = len(tensors[0])
    r = torch.rand((k, 3), generator=generator)
    hf, vf = r[:, 0] < hflip, r[:, 1] < vflip
    rot = (r[:, 2] * 4).long().clamp(max=3) if rot90 else torch.zeros(k, dtype=torch.long)
    code = hf.long() + 2 * vf.long() + 4 * rot
    outs = [t.clone() for t in tensors]
    for c in torch.unique(code).tolist():
        if c == 0:
            continue
        sel = torch.nonzero(code == c, as_tuple=True)[0]
        for src, dst in zip(tensors, outs, strict=True):
            dst[sel] = dihedral(src[sel], k=c // 4, hflip=bool(c & 1), vflip=bool(c & 2))
    return tuple(outs)


# --------------------------------------------------------------------------------------------
# instances of a record


def instance_pixels(record: ImageRecord, i: int) -> Pixels:
    """``(rows, cols)`` int64 arrays of instance ``i``'s pixels (RLE: straight from the runs)."""
    flat = instance_indices(record, i)
    return flat // record.width, flat % record.width


def tight_boxes(pixels: Sequence[Pixels]) -> torch.Tensor:
    """float32 ``[K, 4]`` pixel-edge boxes of instances (``[0, 0, 0, 0]`` for an empty one)."""
    out = torch.zeros((len(pixels), 4), dtype=torch.float32)
    for i, (ys, xs) in enumerate(pixels):
        if len(ys):
            out[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return out


class CropDataset(ImageSource, Dataset):
    """Per-image batches of instance crops and their mask targets (see the module docstring).

    Images are read (and cached) by :class:`cellmask.data.datasets.ImageSource`: ``records``,
    ``read(index)`` and ``len()`` come from it.

    Args:
        records: annotated records (competition RLE or LIVECell polygons).
        crops_cfg: the ``crops`` config section (:func:`crop_config`).
        size: crop side (the model's ``crop.size``).
        sampling_ratio: roi_align samples per cell side (the model's ``crop.sampling_ratio``).
        train: random instance subset, box jitter, flips and rotations; otherwise every instance
            at its tight box, no augmentation.
        image_cache: keep decoded images in memory (per process).

    Items: ``(crops float32 [k, 1, S, S], target)`` with ``target = {"masks": uint8 [k, 1, S, S],
    "boxes": float32 [k, 4], "instances": int64 [k], "image_id": int}``. Randomness comes from
    torch's global RNG (seeded per worker by the engine's loader).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        crops_cfg: Mapping[str, Any] | None = None,
        size: int = 128,
        sampling_ratio: int = 2,
        train: bool = True,
        image_cache: bool = False,
    ) -> None:
        super().__init__(records, image_cache)
        self.cfg = crop_config(crops_cfg)
        self.size = int(size)
        self.sampling_ratio = int(sampling_ratio)
        self.train = train

    def select(self, record: ImageRecord) -> tuple[list[int], list[Pixels]]:
        """The instances of this item (random subset when training) and their pixels."""
        n = len(record)
        order = torch.randperm(n).tolist() if self.train else list(range(n))
        cap = self.cfg["max_instances"] if self.train else None
        cap = n if cap is None else int(cap)
        min_area = max(int(self.cfg["min_area"] or 1), 1)
        chosen: list[int] = []
        pixels: list[Pixels] = []
        for i in order:
            if len(chosen) >= cap:
                break
            ys, xs = instance_pixels(record, i)
            if len(ys) < min_area:
                continue
            chosen.append(i)
            pixels.append((ys, xs))
        return chosen, pixels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.records[index]
        chosen, pixels = self.select(record)
        boxes = tight_boxes(pixels)
        jitter = self.cfg["jitter"]
        if self.train and jitter and len(boxes):
            boxes = jitter_boxes(
                boxes,
                scale=jitter["scale"],
                shift=float(jitter["shift"]),
                p=float(jitter["p"]),
                image_size=(record.height, record.width),
            )
        image = torch.from_numpy(self.read(index)).to(torch.float32).div_(255.0)[None, None]
        crops = crop_rois(image, [boxes], self.size, self.sampling_ratio)
        targets = crop_masks(pixels, boxes, self.size, self.sampling_ratio) >= 0.5
        if self.train and len(boxes):
            crops, targets = random_dihedral(
                crops,
                targets,
                hflip=float(self.cfg["hflip"] or 0),
                vflip=float(self.cfg["vflip"] or 0),
                rot90=bool(self.cfg["rot90"]),
            )
        target = {
            "masks": targets.to(torch.uint8),
            "boxes": boxes,
            "instances": torch.tensor(chosen, dtype=torch.long),
            "image_id": int(index),
        }
        return crops.contiguous(), target
