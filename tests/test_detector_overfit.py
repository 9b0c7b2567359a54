"""Each detector branch, built from its config in the smoke profile, overfits two synthetic images.

Reaching box AP50 >= 0.8 on the training images is only possible when the anchors cover cell
sizes, the box coders decode what they encoded, the samplers feed positives and (for the
cascades) the later stages train on the refined boxes of the earlier ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellmask import CLASS_TO_LABEL
from cellmask.coco_eval import coco_box_ap
from cellmask.config import load_config
from cellmask.data.synthetic import synth_image
from cellmask.models import build_detector

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BRANCHES = [
    "faster_rcnn_swin_t",
    "cascade_rcnn_resnext101",
    "cascade_rcnn_resnest101",
    "cascade_mask_rcnn_resnext101",
]
STEPS = 200


def _two_images(with_masks: bool) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A crowded shsy5y image and a sparse astro one, 128x160, with their truth."""
    images, targets = [], []
    for seed, cell_type in enumerate(("shsy5y", "astro")):
        sample = synth_image(cell_type, 128, 160, rng=seed)
        images.append(torch.from_numpy(sample.image).float().div(255).expand(3, -1, -1).contiguous())
        boxes = torch.tensor(np.stack([inst.box() for inst in sample.instances]), dtype=torch.float32)
        target = {
            "boxes": boxes,
            "labels": torch.full((len(boxes),), CLASS_TO_LABEL[cell_type], dtype=torch.int64),
        }
        if with_masks:
            target["masks"] = torch.from_numpy(sample.masks()).to(torch.uint8)
        targets.append(target)
    return images, targets


@pytest.mark.slow
@pytest.mark.parametrize("branch", BRANCHES)
def test_smoke_branch_overfits_two_images(branch):
    cfg = load_config(CONFIGS / f"{branch}.yaml", profile="smoke")
    torch.manual_seed(0)
    model = build_detector(cfg["model"], num_classes=len(CLASS_TO_LABEL) + 1)
    with_masks = cfg["model"]["type"] == "cascade_mask_rcnn"
    images, targets = _two_images(with_masks)
    assert sum(len(t["boxes"]) for t in targets) >= 20

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    ap = coco_box_ap(outputs, targets, num_classes=len(CLASS_TO_LABEL) + 1)
    assert ap["AP50"] >= 0.8, ap
    if with_masks:
        assert outputs[0]["masks"].shape[-2:] == images[0].shape[-2:]
