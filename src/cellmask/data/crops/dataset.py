"""The segmenter's training data: :class:`CropDataset` (one image's instance crops per item), its
``crops`` config section and the per-step crop cap.

Dataset design
--------------
:class:`CropDataset` yields one item per *image*: all (or, for training, a random subset) of its
instances as crops. Reading and decoding an image once per item and cropping every instance with
one ``roi_align`` call is far cheaper than a flat per-instance dataset that reads an image per
cell. An item is::

    (crops float32 [k, 1, S, S] in 0..1 (gray),
     {"masks": uint8 [k, 1, S, S] 0/1, "boxes": float32 [k, 4] (crop boxes, jittered),
      "instances": int64 [k] (indices into the record), "image_id": int (dataset index),
      "keys": float32 [k] uniform in [0, 1), "max_per_step": int or None (see below)})

and :func:`cellmask.data.datasets.collate` batches items into ``(list of crops, list of
targets)``; the segmenter's ``training_step`` concatenates them. Crops are single-channel: the
model repeats gray to 3 channels itself, which keeps worker-to-trainer traffic 3x smaller.

Crops per training step
-----------------------
The memory of a training step grows with the crops in it (about 96 MB per 128x128 crop for
the paper's Swin-T + UperNet 512 in float32, 53 MB under bfloat16 autocast, measured on CPU by
``benchmarks/bench_segmenter.py``), so two caps bound it:

- ``max_instances``: per image, a random subset of its instances (null: all). It is what bounds
  the work of the loader (decoding, cropping, moving crops to the trainer), so the paper profile
  derives it from the step cap: ``max_per_step / train.batch_size``.
- ``max_per_step``: per step (per process), across the batch's images. Every item carries a
  random ``keys`` float per crop and the cap; :func:`step_subset` (called by the segmenter's
  ``training_step``) keeps the ``max_per_step`` crops of the batch with the smallest keys, i.e. a
  uniform random subset of the batch's crops. The keys are drawn with the item's augmentation,
  from the loader's RNG (the engine seeds it per item from ``(seed, epoch, index)``), so a
  resumed run keeps the same crops, whatever the number of workers.

Config (``crops:`` section, every key required; values in ``configs/segmenter_upernet_swin_t.yaml``)::

    crops:
      max_instances: 64        # per image (random subset); null: all
      max_per_step: 128        # per step, across the batch's images (random subset); null: no cap
      min_area: 4              # instances with fewer mask pixels are not trained on
      jitter: null             # or {p: 1.0, scale: [0.8, 1.2], shift: 0.1}: box jitter
      hflip: 0.5
      vflip: 0.5
      rot90: true              # rotate by k x 90 degrees, k uniform in 0..3
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from cellmask.data.crops.augment import jitter_boxes, random_dihedral
from cellmask.data.crops.geometry import Pixels, crop_masks, crop_rois, instance_pixels, tight_boxes
from cellmask.data.datasets import ImageSource
from cellmask.data.records import ImageRecord

__all__ = ["CROP_KEYS", "CropDataset", "crop_config", "step_subset"]

CROP_KEYS: tuple[str, ...] = (
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
            [0, 1], a cap below 1, or a bad jitter range.
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
    for key in ("max_instances", "max_per_step"):
        if out[key] is not None and int(out[key]) < 1:
            raise ValueError(f"crops.{key} must be null or at least 1, got {out[key]!r}")
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


class CropDataset(ImageSource, Dataset):
    """Per-image batches of instance crops and their mask targets (see the module docstring).

    Images are read (and cached) by :class:`cellmask.data.datasets.ImageSource`: ``records``,
    ``read(index)`` and ``len()`` come from it.

    Args:
        records: annotated records (competition RLE or LIVECell polygons).
        crops_cfg: the complete ``crops`` config section (:func:`crop_config`).
        size: crop side (the model's ``crop.size``).
        sampling_ratio: roi_align samples per cell side (the model's ``crop.sampling_ratio``).
        train: a random subset of at most ``max_instances`` instances, box jitter, flips and
            rotations, and the step cap ``max_per_step``; otherwise every instance of at least
            ``min_area`` pixels at its tight box, no augmentation, no cap.
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

    def select(self, record: ImageRecord) -> tuple[list[int], list[Pixels]]:
        """The instances of this item and their pixels: when training, up to ``max_instances``
        of at least ``min_area`` pixels in a random order (only those scanned are decoded);
        otherwise every instance of at least ``min_area`` pixels."""
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
        cap = self.cfg["max_per_step"] if self.train else None
        target = {
            "masks": targets.to(torch.uint8),
            "boxes": boxes,
            "instances": torch.tensor(chosen, dtype=torch.long),
            "image_id": int(index),
            "keys": torch.rand(len(chosen)),  # drawn last: the draws above are those of an uncapped run
            "max_per_step": None if cap is None else int(cap),
        }
        return crops.contiguous(), target
