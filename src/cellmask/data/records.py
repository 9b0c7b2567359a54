"""The one record type every reader returns: an image with its instances.

Competition ``train.csv`` rows and LIVECell COCO annotations both become
:class:`ImageRecord`; datasets, folds, the metric and plots only ever see this type.
Masks are decoded lazily (:meth:`ImageRecord.masks`), since a reader over 606 images x ~120
cells would otherwise hold gigabytes of bool arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from cellmask.data.polygons import polygon_indices, polygons_to_mask
from cellmask.data.rle import rle_decode, rle_to_runs, runs_to_indices

__all__ = ["ImageRecord", "SegFormat", "polygons_to_mask"]

SegFormat = Literal["rle", "polygon", "none"]


@dataclass
class ImageRecord:
    """One image and its instances.

    Attributes:
        image_id: the competition id (file stem) or the LIVECell file name stem.
        path: image file on disk.
        height, width: image size in pixels.
        cell_type: the image's cell type name (``shsy5y``, ``cort``, ``astro``, or a LIVECell
            type such as ``a172``); ``None`` for unlabeled/test images.
        boxes: float32 ``[N, 4]`` xyxy in pixel-edge coordinates of the original image (a
            mask covering columns ``x0..x1`` has ``x0`` and ``x1 + 1`` as its box edges).
        labels: int64 ``[N]``; 1-based class ids of the record's label space (competition:
            1 shsy5y, 2 cort, 3 astro; LIVECell: see :data:`cellmask.data.livecell.LIVECELL_CLASSES`).
        segmentations: ``N`` items: row-major RLE strings (``seg_format="rle"``) or COCO polygon
            lists ``[[x0, y0, x1, y1, ...], ...]`` (``seg_format="polygon"``).
        seg_format: how ``segmentations`` is encoded.
        sample_id: the group for folds (competition ``sample_id``, falling back to the image id
            where it is empty; LIVECell: the well).
        meta: any other columns, kept verbatim (plate_time, sample_date, ...).
    """

    image_id: str
    path: Path
    height: int
    width: int
    cell_type: str | None = None
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    segmentations: list = field(default_factory=list)
    seg_format: SegFormat = "none"
    sample_id: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def mask(self, i: int) -> np.ndarray:
        """Instance ``i`` as a bool ``[H, W]`` mask."""
        if self.seg_format == "rle":
            return rle_decode(self.segmentations[i], self.height, self.width)
        if self.seg_format == "polygon":
            return polygons_to_mask(self.segmentations[i], self.height, self.width)
        raise ValueError(f"record {self.image_id} has no segmentations")

    def indices(self, i: int) -> np.ndarray:
        """Instance ``i`` as sorted int64 flat row-major pixel indices (``y * W + x``), without an
        ``H x W`` mask: RLE straight from its runs, polygons from their run-length rasterisation
        (:func:`cellmask.data.polygons.polygon_indices`, exactly pycocotools' pixels)."""
        if self.seg_format == "rle":
            return runs_to_indices(*rle_to_runs(self.segmentations[i], self.height, self.width))
        if self.seg_format == "polygon":
            return polygon_indices(self.segmentations[i], self.height, self.width)
        raise ValueError(f"record {self.image_id} has no segmentations")

    def masks(self) -> np.ndarray:
        """All instances as a bool ``[N, H, W]`` stack (decoded now, not cached)."""
        out = np.zeros((len(self), self.height, self.width), dtype=bool)
        for i in range(len(self)):
            out[i] = self.mask(i)
        return out

    def rles(self) -> list[str]:
        """All instances as row-major RLE strings (polygons are rasterised first)."""
        if self.seg_format == "rle":
            return list(self.segmentations)
        from cellmask.data.rle import rle_encode

        return [rle_encode(self.mask(i)) for i in range(len(self))]
