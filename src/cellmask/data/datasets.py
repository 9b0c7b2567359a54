"""Torch datasets over :class:`~cellmask.data.records.ImageRecord` for the detectors.

:class:`DetectionDataset` yields ``(image, target)`` in torchvision's detection convention:
``image`` float32 ``[3, H, W]`` in ``0..1`` (the gray image repeated to 3 channels; the model
normalises), ``target = {"boxes": float32 [N, 4] xyxy pixels, "labels": int64 [N],
"image_id": int (dataset index), "masks": MaskWindows (only with_masks)}``. Records of
either reader work (competition RLE or LIVECell polygons).

Masks (``with_masks``): a :class:`~cellmask.data.layers.MaskWindows`, each kept instance's mask
cropped to its own tight box after the augmentation's warp (the warped label layers are
unpacked straight into windows): the same pixels as a full-image ``uint8 [N, H, W]`` stack
(``.dense()`` gives it) for the cells' pixels instead of ``N`` images, 870 kB per cell at
800x1088. The Cascade Mask R-CNN baseline's mask head reads its targets from these windows.

Boxes and augmentation (lazy mask decoding): a :class:`~cellmask.data.transforms.Pipeline`
first draws the sample's :class:`~cellmask.data.transforms.Plan`. All instance masks are decoded
(packed into label layers, :mod:`cellmask.data.layers`, and warped with the image) only when the
plan rotates or ``with_masks`` asks for them; the boxes are then the tight pixel-edge boxes of
the warped masks (a rotated cell gets a tight box, not the box of a rotated box). Any other
plan (flips, scaling, shifts, resizing) maps the records' boxes, and decodes only the cells
whose box rows/columns it does not all sample (cut by the image border, or shrunk past an
extreme row/column) to give them their exact tight box (:mod:`cellmask.data.sampling`). The
boxes are therefore the same with and without ``with_masks``: the warped masks' tight boxes
(for records whose boxes are mask-tight, as the competition's; LIVECell keeps its COCO boxes
where no mask is decoded). A transform that is not a ``Pipeline`` is called on the whole
sample; if it may move pixels (its ``geometric`` attribute, assumed True when absent) every
mask is decoded and the boxes come from them. Instances smaller than ``min_area`` pixels
(where their masks were decoded) or with a box side below ``min_size`` pixels are dropped
together with their labels; an image may end up with ``boxes`` of shape ``[0, 4]``.

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
from cellmask.data.layers import MaskWindows, layers_from_indices, layers_to_boxes, layers_to_windows
from cellmask.data.records import ImageRecord
from cellmask.data.sampling import SampledBoxes
from cellmask.data.transforms import Pipeline, Plan
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

    def item_groups(self) -> list[str]:
        """The group of each item, for balanced sampling: its image's ``cell_type`` (items are
        records here; a dataset whose items are parts of images overrides it)."""
        return [str(r.cell_type or "") for r in self.records]

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
    """Sorted flat row-major pixel indices of instance ``i`` (:meth:`ImageRecord.indices`: RLE
    from its runs, polygons from their run-length rasterisation; never an ``H x W`` mask)."""
    return record.indices(i)


class DetectionDataset(Dataset):
    """Images with boxes and labels (and optionally masks) for the detectors.

    Args:
        records: annotated records (competition or LIVECell).
        transforms: a :func:`cellmask.data.transforms.build_transforms` pipeline (masks decoded
            only for rotated samples, see the module doc), any other v2 transform taking
            ``{"image": tv_tensors.Image, "layers": tv_tensors.Mask, "boxes":
            tv_tensors.BoundingBoxes}`` (only the keys present), or None.
        with_masks: add ``"masks"`` to the target (mask models): a
            :class:`~cellmask.data.layers.MaskWindows` of the kept instances (uint8 0/1 windows,
            each the tight box of the warped mask, in ``boxes``' order; see the module doc).
        image_cache: keep decoded images in memory (per process: each DataLoader worker has
            its own cache).
        labels_from: ``"record"`` (default: the records' labels as-is, competition 1..3,
            LIVECell 1..8), ``"agnostic"`` (every instance label 1), or a mapping
            ``{record label: label}`` where 0 drops the instance (e.g. ``{6: 1}`` keeps only
            LIVECell's SH-SY5Y as class 1); a label missing from the mapping is an error.
        min_area: drop instances with fewer mask pixels than this (where masks are decoded).
        min_size: drop instances whose box is narrower or lower than this many pixels.
        type_transforms: ``{cell type: transforms}`` used instead of ``transforms`` for the
            records of that type (``augment.by_type``:
            :func:`cellmask.data.transforms.build_type_transforms`).

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
        type_transforms: Mapping[str, Callable] | None = None,
    ) -> None:
        if isinstance(labels_from, str) and labels_from not in ("record", "agnostic"):
            raise ValueError(f"labels_from must be 'record', 'agnostic' or a mapping, got {labels_from!r}")
        self.source = ImageSource(records, image_cache)
        self.transforms = transforms
        self.with_masks = with_masks
        self.labels_from = labels_from
        self.min_area = int(min_area)
        self.min_size = float(min_size)
        self.type_transforms = dict(type_transforms or {})

    def item_groups(self) -> list[str]:
        """Each image's ``cell_type``, for balanced sampling (``train.type_balance``)."""
        return self.source.item_groups()

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
        transforms = self.type_transforms.get(str(record.cell_type), self.transforms)
        plan = transforms.plan() if isinstance(transforms, Pipeline) else None
        if plan is not None:
            geometric, rotates = plan.geometric, plan.rotates
        else:  # no transform, or a foreign one: boxes from the masks whenever it may move pixels
            geometric = transforms is not None and getattr(transforms, "geometric", True)
            rotates = geometric

        decode = n > 0 and has_segs and (self.with_masks or rotates)
        boxes_from_layers = decode and geometric
        sample: dict[str, Any] = {"image": image}
        if decode:
            layers = layers_from_indices(
                [instance_indices(record, i) for i in range(n)], record.height, record.width
            )
            sample["layers"] = tv_tensors.Mask(torch.from_numpy(layers))
        if n > 0 and geometric and not boxes_from_layers:
            sample["boxes"] = tv_tensors.BoundingBoxes(
                torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 4),
                format="XYXY",
                canvas_size=(record.height, record.width),
            )
        if plan is not None:
            sample = transforms.apply(sample, plan)
        elif transforms is not None:
            sample = transforms(sample)
        out_image = sample["image"].as_subclass(torch.Tensor)
        height, width = out_image.shape[-2:]

        areas = None
        if decode:
            layer_boxes, areas = layers_to_boxes(sample["layers"], n)
        if boxes_from_layers:
            boxes = layer_boxes
        elif "boxes" in sample:
            boxes = sample["boxes"].as_subclass(torch.Tensor).to(torch.float32)
            if plan is not None and has_segs:  # a non-rotating plan: fix the cells it cuts
                boxes, areas = _sampled_boxes(record, plan, boxes)
        else:
            boxes = torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)

        keep = labels > 0
        keep &= (boxes[:, 2] - boxes[:, 0] >= self.min_size) & (boxes[:, 3] - boxes[:, 1] >= self.min_size)
        if areas is not None:
            keep &= areas >= max(self.min_area, 1)
        target: dict[str, Any] = {
            "boxes": boxes[keep].contiguous(),
            "labels": labels[keep].contiguous(),
            "image_id": int(index),
        }
        if self.with_masks:  # cropped after the warp: exact windows of the warped masks
            target["masks"] = (
                layers_to_windows(sample["layers"], torch.nonzero(keep)[:, 0])
                if decode
                else MaskWindows.empty((height, width))
            )
        return image_to_tensor(out_image), target


def _sampled_boxes(record: ImageRecord, plan: Plan, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact boxes of a record under a non-rotating plan, from the mapped ``boxes`` ``[N, 4]``:
    instances whose box rows/columns are only partly sampled (cut by the border, or shrunk past
    their extreme row/column) are decoded and get their warped tight box and area
    (:class:`cellmask.data.sampling.SampledBoxes`); hidden ones get area 0; the others keep
    their mapped box.

    Returns:
        ``(boxes float32 [N, 4], areas int64 [N])``, areas the int64 maximum where not known.
    """
    sampled = SampledBoxes(plan, (record.height, record.width))
    covered, hidden = sampled.coverage(record.boxes)
    redo = np.flatnonzero(~covered & ~hidden)
    areas = torch.full((len(boxes),), torch.iinfo(torch.int64).max, dtype=torch.int64)
    areas[torch.from_numpy(hidden)] = 0
    if len(redo):
        boxes = boxes.clone()
        exact, exact_areas = sampled.pixel_boxes([instance_indices(record, int(i)) for i in redo])
        boxes[redo], areas[redo] = exact, exact_areas
    return boxes, areas


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
