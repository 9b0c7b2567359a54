"""Torch datasets over :class:`~cellmask.data.records.ImageRecord` for the detectors.

:class:`DetectionDataset` yields ``(image, target)`` in torchvision's detection convention:
``image`` float32 ``[3, H, W]`` in ``0..1`` (the gray image repeated to 3 channels; the model
normalises), ``target = {"boxes": float32 [N, 4] xyxy pixels, "labels": int64 [N],
"image_id": int (dataset index), "masks": uint8 [N, H, W] (only with_masks)}``. Records of
either reader work (competition RLE or LIVECell polygons).

Boxes and augmentation: when the transform pipeline moves pixels (``pipeline.geometric``; any
transform without that attribute is assumed to), the instance masks are decoded, packed into
label layers (:func:`cellmask.data.transforms.layers_from_indices`), warped with the image, and
the boxes are the tight pixel-edge boxes of the warped masks (so a rotated cell gets a tight
box, not the box of a rotated box). Otherwise the records' own boxes are used and masks are
only decoded for ``with_masks``. Instances smaller than ``min_area`` pixels (where masks were
decoded) or with a box side below ``min_size`` pixels are dropped together with their labels;
an image may end up with ``boxes`` of shape ``[0, 4]``.

:class:`UnlabeledDataset` yields ``(image, index)`` for unlabeled (Soft Teacher) and test
images; :func:`collate` batches either into lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from cellmask.data.images import read_image
from cellmask.data.records import ImageRecord
from cellmask.data.rle import rle_to_runs, runs_to_indices
from cellmask.data.transforms import layers_from_indices, layers_to_boxes, layers_to_masks
from cellmask.errors import DataError

__all__ = ["DetectionDataset", "ImageSource", "UnlabeledDataset", "collate", "image_to_tensor"]

LabelsFrom = str | Mapping[int, int]


def collate(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """``[(image, target), ...]`` -> ``([image, ...], [target, ...])`` (images may differ in size)."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


def image_to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The model input: uint8 ``[H, W]`` / ``[1, H, W]`` (or float in ``0..1``, or ``[3, H, W]``)
    -> plain float32 ``[3, H, W]`` in ``0..1``, gray repeated. Training and inference both use it.

    Raises:
        ValueError: any other shape.
    """
    image = torch.as_tensor(image).as_subclass(torch.Tensor)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [H, W], [1, H, W] or [3, H, W], got {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        image = image.to(torch.float32).div_(255.0)
    else:
        image = image.to(torch.float32)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.contiguous()


class ImageSource:
    """Reads (and optionally caches) the uint8 ``[H, W]`` image of each record.

    The datasets here and :class:`cellmask.data.crops.CropDataset` read their images through it.
    The cache is per process: each DataLoader worker has its own.
    """

    def __init__(self, records: Sequence[ImageRecord], image_cache: bool) -> None:
        self.records = list(records)
        self.image_cache = image_cache
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> np.ndarray:
        """The uint8 ``[H, W]`` image of record ``index``."""
        if index in self._cache:
            return self._cache[index]
        record = self.records[index]
        image = read_image(record.path, (record.height, record.width))
        if self.image_cache:
            self._cache[index] = image
        return image


def instance_indices(record: ImageRecord, i: int) -> np.ndarray:
    """Flat row-major pixel indices of instance ``i`` (RLE: straight from the runs)."""
    if record.seg_format == "rle":
        return runs_to_indices(*rle_to_runs(record.segmentations[i], record.height, record.width))
    return np.flatnonzero(record.mask(i))


class DetectionDataset(Dataset):
    """Images with boxes and labels (and optionally masks) for the detectors.

    Args:
        records: annotated records (competition or LIVECell).
        transforms: a :func:`cellmask.data.transforms.build_transforms` pipeline, any v2
            transform taking ``{"image": tv_tensors.Image, "layers": tv_tensors.Mask,
            "boxes": tv_tensors.BoundingBoxes}`` (only the keys present), or None.
        with_masks: add ``"masks"`` uint8 ``[N, H, W]`` to the target (mask models).
        image_cache: keep decoded images in memory (per process: each DataLoader worker has
            its own cache).
        labels_from: ``"record"`` (default: the records' labels as-is, competition 1..3,
            LIVECell 1..8), ``"agnostic"`` (every instance label 1), or a mapping
            ``{record label: label}`` where 0 drops the instance (e.g. ``{6: 1}`` keeps only
            LIVECell's SH-SY5Y as class 1); a label missing from the mapping is an error.
        min_area: drop instances with fewer mask pixels than this (where masks are decoded).
        min_size: drop instances whose box is narrower or lower than this many pixels.

    Items:
        ``(image float32 [3, H, W] in 0..1, target)``; see the module doc.

    Raises (from ``__getitem__``):
        FileNotFoundError / DataError: a missing or unreadable image, or an image whose size
            differs from its record; DataError: ``with_masks`` on a record without
            segmentations, or a label outside ``labels_from``.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transforms: Callable | None = None,
        with_masks: bool = False,
        image_cache: bool = False,
        labels_from: LabelsFrom = "record",
        min_area: int = 4,
        min_size: float = 2.0,
    ) -> None:
        if isinstance(labels_from, str) and labels_from not in ("record", "agnostic"):
            raise ValueError(f"labels_from must be 'record', 'agnostic' or a mapping, got {labels_from!r}")
        self.source = ImageSource(records, image_cache)
        self.transforms = transforms
        self.with_masks = with_masks
        self.labels_from = labels_from
        self.min_area = int(min_area)
        self.min_size = float(min_size)

    @property
    def records(self) -> list[ImageRecord]:
        return self.source.records

    def __len__(self) -> int:
        return len(self.source)

    def labels(self, record: ImageRecord) -> np.ndarray:
        """The record's labels under ``labels_from`` (int64 ``[N]``; 0 = drop)."""
        labels = np.asarray(record.labels, dtype=np.int64)
        if self.labels_from == "record":
            return labels
        if self.labels_from == "agnostic":
            return np.ones_like(labels)
        mapping = self.labels_from
        missing = sorted({int(v) for v in labels} - {int(k) for k in mapping})
        if missing:
            raise DataError(
                f"record {record.image_id}: label(s) {missing} not in labels_from {dict(mapping)}"
            )
        return np.array([int(mapping[int(v)]) for v in labels], dtype=np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.records[index]
        image = tv_tensors.Image(torch.from_numpy(self.source.read(index))[None])
        labels = torch.from_numpy(self.labels(record))
        n = len(record)
        has_segs = record.seg_format != "none"
        if self.with_masks and n and not has_segs:
            raise DataError(f"record {record.image_id}: with_masks=True but the record has no segmentations")
        geometric = self.transforms is not None and getattr(self.transforms, "geometric", True)

        sample: dict[str, Any] = {"image": image}
        layers_needed = n > 0 and has_segs and (geometric or self.with_masks)
        if layers_needed:
            indices = [instance_indices(record, i) for i in range(n)]
            layers = layers_from_indices(indices, record.height, record.width)
            sample["layers"] = tv_tensors.Mask(torch.from_numpy(layers))
        elif n > 0 and geometric:
            sample["boxes"] = tv_tensors.BoundingBoxes(
                torch.as_tensor(record.boxes, dtype=torch.float32),
                format="XYXY",
                canvas_size=(record.height, record.width),
            )
        if self.transforms is not None:
            sample = self.transforms(sample)
        out_image = sample["image"].as_subclass(torch.Tensor)
        height, width = out_image.shape[-2:]

        masks = None
        if layers_needed:
            if geometric:
                boxes, areas = layers_to_boxes(sample["layers"], n)
            else:
                boxes = torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
                areas = None
            if self.with_masks:
                masks = layers_to_masks(sample["layers"], n)
                if areas is None:
                    areas = masks.flatten(1).sum(1)
        elif "boxes" in sample:
            boxes = sample["boxes"].as_subclass(torch.Tensor).to(torch.float32)
            areas = None
        else:
            boxes = torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
            areas = None

        keep = labels > 0
        keep &= (boxes[:, 2] - boxes[:, 0] >= self.min_size) & (boxes[:, 3] - boxes[:, 1] >= self.min_size)
        if areas is not None:
            keep &= areas >= max(self.min_area, 1)
        target: dict[str, Any] = {
            "boxes": boxes[keep].contiguous(),
            "labels": labels[keep].contiguous(),
            "image_id": int(index),
        }
        if self.with_masks:
            target["masks"] = (
                masks[keep].contiguous()
                if masks is not None
                else torch.zeros((0, height, width), dtype=torch.uint8)
            )
        return image_to_tensor(out_image), target


class UnlabeledDataset(Dataset):
    """Images without targets: ``(image float32 [3, H, W] in 0..1, index)``.

    For Soft Teacher's unlabeled stream and for test-time inference; ``dataset.records[index]``
    gives the record (``image_id``, original size). ``transforms`` is called with the
    ``tv_tensors.Image`` (uint8 ``[1, H, W]``) alone.
    """

    def __init__(
        self, records: Sequence[ImageRecord], transforms: Callable | None = None, image_cache: bool = False
    ) -> None:
        self.source = ImageSource(records, image_cache)
        self.transforms = transforms

    @property
    def records(self) -> list[ImageRecord]:
        return self.source.records

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = tv_tensors.Image(torch.from_numpy(self.source.read(index))[None])
        if self.transforms is not None:
            image = self.transforms(image)
        return image_to_tensor(image), int(index)
