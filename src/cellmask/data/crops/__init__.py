"""Instance crops for the segmentation module: RoIAlign crops of boxes and their mask targets
(:mod:`~cellmask.data.crops.geometry`), box jitter, flips and 90-degree rotations
(:mod:`~cellmask.data.crops.augment`), and :class:`CropDataset` with its ``crops`` config section,
its chunked items (every instance once an epoch, at most ``crops.chunk_size`` crops an item) and the
per-step crop cap (:mod:`~cellmask.data.crops.dataset`). The inverse of the crop, the paste, is
:mod:`cellmask.models.paste`.
"""

from __future__ import annotations

from cellmask.data.crops.augment import dihedral, jitter_boxes, random_dihedral
from cellmask.data.crops.dataset import CROP_KEYS, CropDataset, chunk_bounds, crop_config, step_subset
from cellmask.data.crops.geometry import (
    Pixels,
    crop_masks,
    crop_rois,
    instance_pixels,
    tight_boxes,
    window_groups,
)

__all__ = [
    "CROP_KEYS",
    "CropDataset",
    "Pixels",
    "chunk_bounds",
    "crop_config",
    "crop_masks",
    "crop_rois",
    "dihedral",
    "instance_pixels",
    "jitter_boxes",
    "random_dihedral",
    "step_subset",
    "tight_boxes",
    "window_groups",
]
