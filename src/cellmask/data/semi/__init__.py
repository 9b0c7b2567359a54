"""Soft Teacher's data: weak/strong views of unlabeled images, and labeled + unlabeled batches.

Views
-----
Each unlabeled image gives two views built from the *original* image, each one warp by a 3x3
matrix ``A`` (float64) mapping pixel-edge coordinates ``(x, y, 1)`` of the original image to
those of the view (contract 8: a pixel ``i`` spans ``[i, i + 1]``). Every view keeps the image's
canvas size ``H x W``: the detector's own transform resizes every input to ``model.transform``'s
size, so a scale must move content *within* the canvas to change the scale the detector sees.
Teacher boxes in the weak view map onto the strong view with ``A_strong @ inv(A_weak)``
(:func:`relative_matrix`, :func:`transform_boxes`) as the box of their four mapped corners:
exact for flips, scales and shifts; around a rotation or a shear the box of the rotated/sheared
box, as [22]'s ``Transform2D.transform_bboxes`` maps them.

The teacher's (weak) view is always whole: the image may shrink inside its canvas, never zoom
past it, because a cell the teacher cannot see is a negative at full weight for the student
wherever the strong view shows it, and a cell the canvas cuts becomes a truncated pseudo-box
(:func:`semi_data_config` rejects a weak view that could cut the image).

Two sets of views (``semi.weak`` / ``semi.strong``, :func:`semi_data_config`):

- **[22]'s default pipelines** (the paper profile, :data:`DEFAULT_SEMI_DATA`;
  :mod:`cellmask.data.semi.pipelines`): ``rand_resize`` (``RandResize`` of
  ``configs/soft_teacher/base.py``, as a content scale relative to the test scale) and a
  horizontal flip for both views; the strong view adds, in a random order, one of nine colour
  ops (:mod:`cellmask.data.semi.randaug`) and one of translate/rotate/shear, then 1-4 erased
  patches (``RandErase``); uncovered canvas and patches take [22]'s fill 125. Labeled images
  get [22]'s labeled pipeline (resize, flip, colour: ``semi.labeled``,
  :func:`build_labeled_transforms`);
- **the smaller set** (cpu/demo/smoke, :data:`COMPACT_VIEWS`): flips, a scale (<= 1 for the
  weak view) and a shift about the image centre, brightness/contrast, Gaussian blur (the
  ``cellmask.data.transforms`` ops, same keys as ``augment:``) and square cutout; labeled
  images take the supervised detectors' ``augment:`` (``labeled: null``).

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
      labeled:                  # null: the augment: section; else [22]'s labeled pipeline
        hflip: 0.5
        vflip: 0.0
        rand_resize: {img_scale: [[1333, 400], [1333, 1200]], test_scale: [1333, 800]}
        color: {ops: [identity, autocontrast, ...], magnitude: [1, 9]}
        fill: 125
      weak:
        hflip: 0.5
        vflip: 0.0
        scale: null             # [lo, hi] (or r: [1 - r, 1 + r]) without rand_resize
        shift: 0.0              # translation drawn from [-shift, shift] x (W, H), without rand_resize
        rand_resize: {img_scale: ..., test_scale: ...}   # null: scale/shift above
        max_scale: 1.0          # a drawn scale above this is clamped to it
        fill: 125               # gray value of uncovered canvas
      strong:
        hflip, vflip, scale, shift, rand_resize, fill: as weak
        color: {ops: [...], magnitude: [1, 9]}
        geometric: {ops: [translate_x, translate_y, rotate, shear], translate: [-0.1, 0.1],
                    rotate: [-30, 30], shear: [-30, 30]}
        brightness_contrast: null   # {p, brightness, contrast} (augment:'s op)
        gaussian_blur: null         # {p, kernel, sigma} (augment:'s op)
        erase: {p: 1.0, count: [1, 4], size: [0.0, 0.2], shape: image}   # count inclusive

Every random draw comes from torch's RNG (reproducible under ``torch.manual_seed`` and the
engine's per-epoch loader seeding).
"""

from cellmask.data.semi.config import COMPACT_VIEWS, DEFAULT_SEMI_DATA, semi_data_config
from cellmask.data.semi.datasets import SemiDataset, TwoViewDataset, collate_semi, load_unlabeled
from cellmask.data.semi.pipelines import (
    CanvasResize,
    ViewDraw,
    build_labeled_transforms,
    draw_view,
    render_view,
)
from cellmask.data.semi.randaug import ColorOneOf
from cellmask.data.semi.views import (
    erase_patches,
    relative_matrix,
    sample_view,
    transform_boxes,
    view_matrix,
    warp_image,
)

__all__ = [
    "COMPACT_VIEWS",
    "DEFAULT_SEMI_DATA",
    "CanvasResize",
    "ColorOneOf",
    "SemiDataset",
    "TwoViewDataset",
    "ViewDraw",
    "build_labeled_transforms",
    "collate_semi",
    "draw_view",
    "erase_patches",
    "load_unlabeled",
    "relative_matrix",
    "render_view",
    "sample_view",
    "semi_data_config",
    "transform_boxes",
    "view_matrix",
    "warp_image",
]
