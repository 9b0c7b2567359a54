"""Detectors: ``build_detector(model_cfg, num_classes)`` (the segmenter: ``cellmask.models.segmenter``).

Importing this package is cheap: builders (and torch / torchvision / timm) are imported when a
detector is built (:mod:`~cellmask.models.registry`).
"""

from cellmask.models.registry import DETECTOR_TYPES, build_detector, register_detector

__all__ = ["DETECTOR_TYPES", "build_detector", "register_detector"]
