"""The segmentation module: UperNet Swin-T on 128x128 RoIAlign crops of every box.

In MDE-CellMask the masks come from one class-agnostic segmenter, not from the detectors: each
(fused) box is cropped from the full image with RoIAlign to ``S x S`` (128), the segmenter
predicts the cell's binary mask in the crop, and the probabilities are pasted back into the
image at the box.

- :mod:`~cellmask.models.segmenter.model`: :class:`Segmenter` (the network, its losses,
  training step and batched ``predict``) and :func:`build_segmenter` (from a config's complete
  ``model`` section);
- :mod:`~cellmask.models.segmenter.evaluate`: :func:`evaluate_segmenter` (mean mask IoU on truth
  boxes) and :func:`instance_ious`;
- the crops and their training targets: :mod:`cellmask.data.crops`; the paste (the inverse of the
  crop, shared with the Cascade Mask R-CNN baseline): :mod:`cellmask.models.paste`, whose
  :class:`PastedMasks` and :func:`paste_masks` are re-exported here.
"""

from __future__ import annotations

from cellmask.data.crops import crop_rois
from cellmask.models.paste import PastedMasks, paste_masks
from cellmask.models.segmenter.evaluate import evaluate_segmenter, instance_ious
from cellmask.models.segmenter.model import (
    SEGMENTER_TYPE,
    Segmenter,
    build_segmenter,
    dice_loss,
    is_segmenter_config,
)

__all__ = [
    "SEGMENTER_TYPE",
    "PastedMasks",
    "Segmenter",
    "build_segmenter",
    "crop_rois",
    "dice_loss",
    "evaluate_segmenter",
    "instance_ious",
    "is_segmenter_config",
    "paste_masks",
]
