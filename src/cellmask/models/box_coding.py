"""Box arithmetic in float32 under autocast (contract 9): the box coder and the anchors.

Under ``torch.autocast`` the heads' outputs (box deltas, feature maps) are float16/bfloat16, and
torchvision's box arithmetic follows them:

- ``BoxCoder.decode_single`` casts the reference boxes to the deltas' dtype, so the RPN decodes
  its proposals (and the RoI heads their detections) from anchors rounded to 0.5-1 px at
  800x1088 in float16 (4-8 px in bfloat16);
- ``AnchorGenerator`` builds the anchors in the feature maps' dtype;
- ``RoIHeads.select_training_samples`` casts the truth boxes to the proposals' dtype, so low
  precision proposals make low precision regression targets.

:class:`Float32BoxCoder` and :class:`Float32AnchorGenerator` are drop-in subclasses that compute
in float32 whatever the inputs' dtype: anchors, proposals, regression targets and decoded boxes
are float32, and so is everything derived from them. Neither has parameters or buffers (state
dicts are unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

__all__ = ["Float32AnchorGenerator", "Float32BoxCoder"]


class Float32BoxCoder(BoxCoder):
    """torchvision's ``BoxCoder`` computing in float32 (deltas and boxes are cast up first).

    ``encode(reference_boxes, proposals)`` -> float32 ``[N, 4]`` deltas per image;
    ``decode(rel_codes, boxes)`` -> float32 ``[N, K, 4]`` xyxy boxes.
    """

    def encode(self, reference_boxes: Sequence[Tensor], proposals: Sequence[Tensor]) -> list[Tensor]:
        return list(super().encode([b.float() for b in reference_boxes], [p.float() for p in proposals]))

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        return super().encode_single(reference_boxes.float(), proposals.float())

    def decode(self, rel_codes: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        return super().decode(rel_codes.float(), [b.float() for b in boxes])

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        return super().decode_single(rel_codes.float(), boxes.float())


class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` whose anchors are float32 whatever the features' dtype.

    The generator reads only the feature maps' sizes, dtype and device; it is given zero-cost
    float32 stand-ins of the same shapes (a one-element tensor expanded), never a copy.
    """

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        shapes = [torch.empty((), dtype=torch.float32, device=f.device).expand(f.shape) for f in feature_maps]
        return super().forward(image_list, shapes)
