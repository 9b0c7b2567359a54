"""Soft Teacher's data: weak/strong views of unlabeled images, and labeled + unlabeled batches.

Views
-----
Each unlabeled image gives two views built from the *original* image:

- a **weak** view for the teacher: flips and a scale (<= 1) about the image centre. The
  teacher's view is whole: the image shrinks inside its canvas, never zooms past it, because a
  cell the teacher cannot see is a negative at full weight for the student wherever the strong
  view shows it, and a cell the canvas cuts becomes a truncated pseudo-box
  (:func:`semi_data_config` rejects a weak view that would cut the image);
- a **strong** view for the student: flips, scale jitter and a shift (a crop or a pad of the
  scaled content), then brightness/contrast, Gaussian blur (the ``cellmask.data.transforms``
  ops, same keys as ``augment:``) and cutout (1-5 square patches filled with ``fill``).

Every view keeps the image's canvas size ``H x W`` (the detector's own transform resizes every
input to ``model.transform.min_size``, so a scale jitter must move content *within* the canvas to
have any effect). The geometry of a view is one 3x3 matrix ``A`` (float64) mapping pixel-edge
coordinates ``(x, y, 1)`` of the original image to those of the view (contract 8: a pixel
``i`` spans ``[i, i + 1]``). Teacher boxes in the weak view map onto the strong view with
``A_strong @ inv(A_weak)`` (:func:`relative_matrix`, :func:`transform_boxes`); flips, scales
and shifts keep boxes axis-aligned, so the mapping is exact.

Batches
-------
:class:`SemiDataset` item ``g`` is one *group*: ``ratio[0]`` labeled images
(:class:`~cellmask.data.datasets.DetectionDataset` items) and ``ratio[1]`` unlabeled ones
(:class:`TwoViewDataset` items); ``train.batch_size`` groups make a step. One epoch is one pass
over the longer stream (``ceil(n / ratio)``), the shorter one cycling. :func:`collate_semi`
batches groups into the dict ``SoftTeacher.training_step`` takes.

Config (``semi:`` section; keys and defaults in :data:`DEFAULT_SEMI_DATA`)::

    semi:
      unlabeled_dir: null       # default <data root>/train_semi_supervised/ (relative: to the root)
      ratio: [1, 1]             # labeled : unlabeled images per group (paper 1:1)
      epoch_length: null        # groups per epoch (null: one pass over the longer stream)
      crop: null                # [H, W]: both views of an unlabeled image come from one random
                                # window of it at native resolution (as augment.crop for labeled)
      weak: {hflip: 0.5, vflip: 0.5, scale: [0.8, 1.0], shift: 0.0, fill: 0}   # whole image
      strong:
        hflip: 0.5
        vflip: 0.5
        scale: [0.8, 1.2]       # factor drawn uniformly from this range
        shift: 0.1              # translation drawn from [-shift, shift] x (W, H)
        fill: 0                 # gray value of uncovered canvas and of cutout patches
        brightness_contrast: {p: 0.8, brightness: 0.3, contrast: 0.3}
        gaussian_blur: {p: 0.5, kernel: 5, sigma: [0.1, 2.0]}
        erase: {p: 0.7, count: [1, 5], size: [0.05, 0.2]}   # square side: fraction of min(H, W)

Every random draw comes from torch's RNG (reproducible under ``torch.manual_seed`` and the
engine's per-epoch loader seeding).
"""

from cellmask.data.semi.config import DEFAULT_SEMI_DATA, semi_data_config
from cellmask.data.semi.datasets import SemiDataset, TwoViewDataset, collate_semi, load_unlabeled
from cellmask.data.semi.views import (
    erase_patches,
    relative_matrix,
    sample_view,
    transform_boxes,
    view_matrix,
    warp_image,
)

__all__ = [
    "DEFAULT_SEMI_DATA",
    "SemiDataset",
    "TwoViewDataset",
    "collate_semi",
    "erase_patches",
    "load_unlabeled",
    "relative_matrix",
    "sample_view",
    "semi_data_config",
    "transform_boxes",
    "view_matrix",
    "warp_image",
]
