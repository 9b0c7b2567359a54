"""The segmenter's training data: :class:`CropDataset` (instance crops of one image per item),
its ``crops`` config section and the per-step crop cap.

Dataset design
--------------
:class:`CropDataset` yields instance crops of *one image* per item. Reading and decoding an image
once per item and cropping its instances with one ``roi_align`` call is far cheaper than a flat
per-instance dataset that reads an image per cell. Training items come in one of two layouts
(``crops.chunk_size``):

- **per image** (``chunk_size: null``; the demo, cpu and smoke profiles): one item per image,
  a random subset of at most ``max_instances`` of its instances (null: all of them), drawn
  afresh every epoch.
- **chunked** (``chunk_size: K``; the paper profile, which trains on every truth box): each
  image's instances are split into ``ceil(n / K)`` chunks of near-equal size (at most ``K``), and
  there is one item per ``(image, chunk)`` pair, so one epoch of the engine's loader visits every
  instance of every image exactly once, and no item holds more than ``K`` crops, however crowded
  the image (LIVECell: ~313 cells, competition images up to ~2000). The split is a permutation of
  the image's instances seeded by its ``image_id`` (fixed across epochs: the dataset never sees
  the epoch, which keeps an item a function of ``(seed, epoch, index)`` and a resumed run
  bit-exact); the loader shuffles the chunks and pairs them into steps afresh every epoch, and
  every crop's augmentation is redrawn every epoch. Images without instances have no item.

An item is::

    (crops float32 [k, 1, S, S] in 0..1 (gray),
     {"masks": uint8 [k, 1, S, S] 0/1, "boxes": float32 [k, 4] (crop boxes, xyxy pixel edges,
      jittered), "instances": int64 [k] (indices into the record), "image_id": int (index of the
      record in ``records``; chunked items of one image share it), "keys": float32 [k] uniform in
      [0, 1), "max_per_step": int or None (see below)})

and :func:`cellmask.data.datasets.collate` batches items into ``(list of crops, list of
targets)``; the segmenter's ``training_step`` concatenates them. Crops are single-channel: the
model repeats gray to 3 channels itself, which keeps worker-to-trainer traffic 3x smaller.
Evaluation items (``train=False``) are always one per image with every instance.

Crops per training step
-----------------------
The memory of a training step grows with the crops in it (about 96 MB per 128x128 crop for
the paper's Swin-T + UperNet 512 in float32, 53 MB under bfloat16 autocast, measured on CPU by
``benchmarks/bench_segmenter.py``), so the crops of an item and of a step are bounded:

- ``chunk_size`` (chunked) or ``max_instances`` (per image) bound an item, and with it the work
  of the loader (decoding, cropping, moving crops to the trainer). The two exclude each other.
  A step holds at most ``train.batch_size`` items.
- ``max_per_step``: per step (per process), across the batch's images. Every item carries a
  random ``keys`` float per crop and the cap; :func:`step_subset` (called by the segmenter's
  ``training_step``) keeps the ``max_per_step`` crops of the batch with the smallest keys, i.e. a
  uniform random subset of the batch's crops. The keys are drawn with the item's augmentation,
  from the loader's RNG (the engine seeds it per item from ``(seed, epoch, index)``), so a
  resumed run keeps the same crops, whatever the number of workers. With ``chunk_size x
  train.batch_size <= max_per_step`` (the paper profile: 64 x 2 = 128) the cap never binds and
  every instance is trained on; above it, the cap is a memory guard that drops crops.

Config (``crops:`` section, every key required; values in ``configs/segmenter_upernet_swin_t.yaml``)::

    crops:
      chunk_size: 64           # chunked items of at most 64 instances, every instance once an
                               # epoch; null: one item per image (max_instances)
      max_instances: null      # per image (random subset; null: all); null when chunk_size is set
      max_per_step: 128        # per step, across the batch's images (random subset); null: no cap
      min_area: 4              # instances with fewer mask pixels are not trained on
      jitter: null             # or {p: 1.0, scale: [0.8, 1.2], shift: 0.1}: box jitter
      hflip: 0.5
      vflip: 0.5
      rot90: true              # rotate by k x 90 degrees, k uniform in 0..3
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from cellmask.data.crops.augment import jitter_boxes, random_dihedral
from cellmask.data.crops.geometry import Pixels, crop_masks, crop_rois, instance_pixels, tight_boxes
from cellmask.data.datasets import ImageSource
from cellmask.data.records import ImageRecord

__all__ = ["CROP_KEYS", "CropDataset", "chunk_bounds", "crop_config", "step_subset"]

CROP_KEYS: tuple[str, ...] = (
    "chunk_size",
    "max_instances",
    "max_per_step",
    "min_area",
    "jitter",
    "hflip",
    "vflip",
    "rot90",
)
"""The keys of the ``crops`` config section (see the module docstring)."""

JITTER_KEYS: tuple[str, ...] = ("p", "scale", "shift")
"""The keys of ``crops.jitter`` when it is not null."""


def _check_keys(section: Mapping[str, Any], keys: Sequence[str], where: str, hint: str) -> None:
    """Raise a ValueError naming the first unknown or missing key of ``section`` (at ``where``)."""
    unknown = set(section) - set(keys)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected {sorted(keys)}")
    for key in keys:
        if key not in section:
            raise ValueError(f"{where}.{key}: missing ({hint})")


def crop_config(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The validated ``crops`` section: every key of :data:`CROP_KEYS` present (the numbers live
    in the config files, not here).

    Raises:
        ValueError: a missing section or key (named), an unknown key, a probability outside
            [0, 1], a cap below 1, both ``chunk_size`` and ``max_instances`` set, or a bad jitter
            range.
    """
    hint = "see the crops section of configs/segmenter_upernet_swin_t.yaml"
    if not isinstance(cfg, Mapping):
        raise ValueError(f"crops: missing section (need {', '.join(CROP_KEYS)}; {hint})")
    out = dict(cfg)
    _check_keys(out, CROP_KEYS, "crops", hint)
    jitter = out["jitter"]
    if jitter:
        _check_keys(jitter, JITTER_KEYS, "crops.jitter", "or set crops.jitter: null")
        lo, hi = (float(s) for s in jitter["scale"])
        if not 0 < lo <= hi or float(jitter["shift"]) < 0:
            raise ValueError(f"crops.jitter: need 0 < scale[0] <= scale[1] and shift >= 0, got {jitter}")
    out["jitter"] = dict(jitter) if jitter else None
    for key in ("chunk_size", "max_instances", "max_per_step"):
        if out[key] is not None and int(out[key]) < 1:
            raise ValueError(f"crops.{key} must be null or at least 1, got {out[key]!r}")
    if out["chunk_size"] is not None and out["max_instances"] is not None:
        raise ValueError(
            "crops.chunk_size (every instance, in chunks) and crops.max_instances (a random subset "
            f"per image) exclude each other: set one to null, got {out['chunk_size']!r} and "
            f"{out['max_instances']!r}"
        )
    probs = {"hflip": out["hflip"], "vflip": out["vflip"]}
    if out["jitter"]:
        probs["jitter.p"] = out["jitter"]["p"]
    for key, value in probs.items():
        if not 0.0 <= float(value or 0) <= 1.0:
            raise ValueError(f"crops.{key} must be a probability in [0, 1], got {value!r}")
    return out


def step_subset(targets: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
    """The crops of a collated batch that a training step keeps under ``crops.max_per_step``.

    Args:
        targets: the batch's :class:`CropDataset` targets, in batch order (their ``keys`` and
            ``max_per_step``; targets without ``max_per_step`` set no cap).

    Returns:
        None when the batch holds at most the smallest cap of its targets (or none is set);
        otherwise int64 ``[max_per_step]``: indices into the batch's concatenated crops, in
        increasing order, of the crops with the smallest keys (a uniform random subset, as the
        keys are uniform and independent), on the keys' device.
    """
    caps = [int(t["max_per_step"]) for t in targets if t.get("max_per_step") is not None]
    if not caps:
        return None
    keys = torch.cat([t["keys"].reshape(-1) for t in targets])
    cap = min(caps)
    if len(keys) <= cap:
        return None
    return torch.sort(torch.argsort(keys, stable=True)[:cap]).values


def chunk_bounds(n: int, chunk_size: int) -> list[int]:
    """Boundaries of ``n`` instances split into ``ceil(n / chunk_size)`` chunks of near-equal size.

    Returns:
        ``c + 1`` increasing ints from 0 to ``n``; chunk ``j`` is ``[b[j], b[j + 1])``. Sizes differ
        by at most one and none exceeds ``chunk_size`` (313 instances at 64: 62, 63, 62, 63, 63;
        no chunk of a few leftovers). ``n == 0``: ``[0]`` (no chunk).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    c = -(-n // chunk_size)
    return [j * n // c for j in range(c + 1)] if c else [0]


class CropDataset(ImageSource, Dataset):
    """Instance crops of one image and their mask targets per item (see the module docstring).

    Images are read (and cached) by :class:`cellmask.data.datasets.ImageSource`: ``records`` and
    ``read(image index)`` come from it. ``len()`` is the number of images, or for chunked
    training (``crops.chunk_size``) the number of ``(image, chunk)`` items (:attr:`items`).

    Args:
        records: annotated records (competition RLE or LIVECell polygons).
        crops_cfg: the complete ``crops`` config section (:func:`crop_config`).
        size: crop side (the model's ``crop.size``).
        sampling_ratio: roi_align samples per cell side (the model's ``crop.sampling_ratio``).
        train: the instances of a chunk (``chunk_size``) or a random subset of at most
            ``max_instances`` of an image's, box jitter, flips and rotations, and the step cap
            ``max_per_step``; otherwise one item per image with every instance, at its tight
            box, no augmentation, no cap. Either way only instances of at least ``min_area``
            pixels give crops.
        image_cache: keep decoded images in memory (per process).

    Items: ``(crops float32 [k, 1, S, S], target)`` with ``target = {"masks": uint8 [k, 1, S, S],
    "boxes": float32 [k, 4], "instances": int64 [k], "image_id": int, "keys": float32 [k],
    "max_per_step": int | None}``. Randomness comes from torch's global RNG, which the engine's loader
    seeds per item from (seed, epoch, index).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        crops_cfg: Mapping[str, Any] | None,
        *,
        size: int,
        sampling_ratio: int,
        train: bool = True,
        image_cache: bool = False,
    ) -> None:
        super().__init__(records, image_cache)
        self.cfg = crop_config(crops_cfg)
        self.size = int(size)
        self.sampling_ratio = int(sampling_ratio)
        self.train = train
        chunk = self.cfg["chunk_size"] if train else None
        self.chunk_size: int | None = None if chunk is None else int(chunk)
        self.items: list[tuple[int, int]] | None = None
        """Chunked training: ``(image index, chunk index)`` of every item, image by image; else None."""
        if self.chunk_size is not None:
            self.items = []
            for image, record in enumerate(self.records):
                chunks = len(chunk_bounds(len(record), self.chunk_size)) - 1
                self.items.extend((image, j) for j in range(chunks))

    def __len__(self) -> int:
        return len(self.records) if self.items is None else len(self.items)

    def item_groups(self) -> list[str]:
        """Each item's image's ``cell_type`` (a chunk belongs to its image's group)."""
        groups = super().item_groups()
        return groups if self.items is None else [groups[image] for image, _ in self.items]

    def chunk(self, index: int) -> tuple[int, list[int]]:
        """``(image index, instance indices)`` of chunked item ``index``: the ``j``-th slice of
        :func:`chunk_bounds` over a permutation of the image's instances that depends only on its
        ``image_id`` (the same in every epoch and process; torch's global RNG is not used)."""
        if self.items is None or self.chunk_size is None:
            raise ValueError("chunk() needs a chunked training dataset (crops.chunk_size set, train=True)")
        image, j = self.items[index]
        record = self.records[image]
        generator = torch.Generator().manual_seed(zlib.crc32(str(record.image_id).encode()))
        order = torch.randperm(len(record), generator=generator)
        bounds = chunk_bounds(len(record), self.chunk_size)
        return image, sorted(order[bounds[j] : bounds[j + 1]].tolist())

    def select(
        self, record: ImageRecord, candidates: Sequence[int] | None = None
    ) -> tuple[list[int], list[Pixels]]:
        """The instances of this item and their pixels: the ``candidates`` (a chunk) of at least
        ``min_area`` pixels; without candidates, when training, up to ``max_instances`` of at
        least ``min_area`` pixels in a random order (only those scanned are decoded), otherwise
        every instance of at least ``min_area`` pixels."""
        n = len(record)
        cap = n
        if candidates is not None:
            order = list(candidates)
        elif self.train:
            order = torch.randperm(n).tolist()
            cap = n if self.cfg["max_instances"] is None else int(self.cfg["max_instances"])
        else:
            order = list(range(n))
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
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of a CropDataset of {len(self)} items")
        image, candidates = (index, None) if self.items is None else self.chunk(index)
        record = self.records[image]
        chosen, pixels = self.select(record, candidates)
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
        gray = torch.from_numpy(self.read(image)).to(torch.float32).div_(255.0)[None, None]
        crops = crop_rois(gray, [boxes], self.size, self.sampling_ratio)
        targets = crop_masks(pixels, boxes, self.size, self.sampling_ratio) >= 0.5
        if self.train and len(boxes):
            crops, targets = random_dihedral(
                crops,
                targets,
                hflip=float(self.cfg["hflip"] or 0),
                vflip=float(self.cfg["vflip"] or 0),
                rot90=bool(self.cfg["rot90"]),
            )
        cap = self.cfg["max_per_step"] if self.train else None
        target = {
            "masks": targets.to(torch.uint8),
            "boxes": boxes,
            "instances": torch.tensor(chosen, dtype=torch.long),
            "image_id": int(image),
            "keys": torch.rand(len(chosen)),  # drawn last: the draws above are those of an uncapped run
            "max_per_step": None if cap is None else int(cap),
        }
        return crops.contiguous(), target
