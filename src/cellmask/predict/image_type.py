"""The image-type decision of the pipeline when a classifier makes it (``predict.type_classifier``:
:mod:`cellmask.models.image_type`); otherwise the class vote over the detections decides
(:func:`cellmask.predict.pipeline.image_class`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class ImageTyper:
    """Loads each classifier run once and answers per image; the answer for the last image is
    kept, so the rows of an ablation (several calls on one image) classify it once.

    ``typer(image, opts)`` -> the 1-based type of ``image`` (float ``[3, H, W]`` on ``device``) by
    ``opts["type_classifier"]``, or ``None`` when the class vote is off or no classifier is named.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.models: dict[str, torch.nn.Module] = {}
        self.last: tuple[tuple[Any, ...], int] | None = None

    def __call__(self, image: torch.Tensor, opts: Mapping[str, Any]) -> int | None:
        from cellmask.models.image_type import image_types
        from cellmask.predict.runs import load_type_classifier

        path = opts.get("type_classifier")
        if not (opts["class_vote"] and path):
            return None
        key = (str(path), image.data_ptr(), tuple(image.shape))
        if self.last is not None and self.last[0] == key:
            return self.last[1]
        if str(path) not in self.models:
            self.models[str(path)] = load_type_classifier(path, self.device)[0]
        label = image_types(self.models[str(path)], [image])[0]
        self.last = (key, label)
        return label
