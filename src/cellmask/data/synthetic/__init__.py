"""A synthetic stand-in for the Sartorius competition data and LIVECell, in their exact layout.

``cellmask synth OUT`` writes, under ``OUT``::

    train.csv                       one row per instance, the competition's nine columns
    train/<id>.png                  annotated images (8-bit gray, 520x704 by default)
    train_semi_supervised/<id>.png  unlabeled images
    test/<id>.png                   test images
    sample_submission.csv           id,predicted (empty predictions)
    LIVECell_dataset_2021/images/livecell_train_val_images/<name>.tif
    LIVECell_dataset_2021/images/livecell_test_images/<name>.tif
    LIVECell_dataset_2021/annotations/LIVECell/livecell_coco_{train,val,test}.json

so every reader, dataset and notebook runs on it unchanged. The same seed gives the same bytes.

Images imitate phase-contrast microscopy: each cell adds to an optical-thickness map, and the
image is a high-pass of that map (dark rims inside objects, bright halos around them) over a
textured, unevenly lit gray background. Per cell type (:data:`CELL_STYLES`):

- ``shsy5y``: hundreds of small, irregular, elongated cells, crowded and touching, with short
  neurites, clusters of dead-cell blebs and a faint carpet of unannotated flat cells;
- ``cort``: a few dozen small round somata in small groups, long thin processes radiating from
  them (not part of the masks) and many dark debris dots;
- ``astro``: fewer, larger cells: spindle bodies with long tapering arms (part of the masks) and
  some large, faint, flat cells.

As in the real annotations, masks of touching cells may overlap by a pixel or two and a few
cells overlap more. Instances are produced as small crops (:class:`Instance`), so hundreds of
cells per image cost milliseconds; full-size masks are only built on request.

Where things are:

- :mod:`cellmask.data.synthetic.styles`: :class:`CellStyle` and the per-type tables;
- :mod:`cellmask.data.synthetic.cells`: cell geometry and placement (:class:`Instance` crops);
- :mod:`cellmask.data.synthetic.render`: the image, :func:`synth_image`;
- :mod:`cellmask.data.synthetic.writers`: the Kaggle/LIVECell layout, :func:`write_dataset`,
  ``cellmask synth`` (:func:`cli_synth`).
"""

from cellmask.data.sartorius import TRAIN_COLUMNS
from cellmask.data.synthetic.cells import Instance
from cellmask.data.synthetic.render import SyntheticSample, synth_image
from cellmask.data.synthetic.styles import (
    CELL_STYLES,
    COMPETITION_TYPES,
    LIVECELL_STYLES,
    LIVECELL_TYPES,
    CellStyle,
)
from cellmask.data.synthetic.writers import cli_synth, parse_size, write_dataset

__all__ = [
    "CELL_STYLES",
    "COMPETITION_TYPES",
    "LIVECELL_STYLES",
    "LIVECELL_TYPES",
    "TRAIN_COLUMNS",
    "CellStyle",
    "Instance",
    "SyntheticSample",
    "cli_synth",
    "parse_size",
    "synth_image",
    "write_dataset",
]
