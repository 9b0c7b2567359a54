"""Lazy mask decoding in DetectionDataset: boxes without masks equal the boxes of the warped
masks for every non-rotating plan, and masks are decoded only for what needs them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

import cellmask.data.datasets as datasets_module
from cellmask.data.augment import AffineParams, Flip, Resize, ShiftScaleRotate
from cellmask.data.datasets import DetectionDataset
from cellmask.data.transforms import Pipeline, build_transforms

torch.set_num_threads(1)

H, W = 520, 704


class FixedAffine(ShiftScaleRotate):
    """A shift-scale-rotate that always draws the same parameters (test helper)."""

    def __init__(self, angle: float = 0.0, scale: float = 1.0, dx: float = 0.0, dy: float = 0.0) -> None:
        super().__init__(p=1.0, shift=0.0, scale=0.0, rotate=0.0)
        self.params = AffineParams(angle, scale, dx, dy)

    def draw(self) -> AffineParams:
        return self.params


COMBOS = {
    "hflip": [Flip("horizontal", 1.0)],
    "vflip": [Flip("vertical", 1.0)],
    "hvflip": [Flip("horizontal", 1.0), Flip("vertical", 1.0)],
    "scale_up": [FixedAffine(scale=1.12)],  # cuts the cells along the border
    "scale_down": [FixedAffine(scale=0.86, dx=0.01)],  # skips source rows/columns
    "shift": [FixedAffine(dx=0.031, dy=-0.047)],  # sub-pixel shift, cells pushed out
    "resize_up": [Resize((800, 1083))],  # the authors' fine-tuning scale
    "resize_down": [Resize((400, 541))],
    "all": [
        Resize((540, 720)),
        Flip("horizontal", 1.0),
        Flip("vertical", 1.0),
        FixedAffine(scale=1.13, dx=-0.05),
    ],
}


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[str, int]]:
    """Records every ``(image_id, instance)`` the dataset decodes."""
    calls: list[tuple[str, int]] = []
    decode = datasets_module.instance_indices

    def counting(record, i):
        calls.append((record.image_id, i))
        return decode(record, i)

    monkeypatch.setattr(datasets_module, "instance_indices", counting)
    return calls


# one image per cell type; de504eaa5349 (496 shsy5y cells) has overlapping and duplicated masks
IMAGES = ("de504eaa5349", "0140b3c8f445", "01ae5a43a2ab")


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_box_only_path_equals_the_masks_path(real_records, combo, decoded):
    """Boxes without decoding equal the tight boxes of the warped masks (the decode-always path:
    a transform that is not a Pipeline), instance for instance."""
    pipeline = Pipeline(COMBOS[combo])
    kwargs = {"min_area": 1, "min_size": 0.5}  # keep everything that is visible at all
    for record in [r for r in real_records if r.image_id in IMAGES]:
        n = len(record)
        decoded.clear()
        _, plain = DetectionDataset([record], pipeline, **kwargs)[0]
        box_only_decoded = {i for _, i in decoded}
        decoded.clear()
        _, old = DetectionDataset([record], lambda sample: pipeline(sample), **kwargs)[0]
        assert len(decoded) == n  # the masks path decodes every instance
        assert torch.equal(plain["labels"], old["labels"])
        np.testing.assert_array_equal(plain["boxes"].numpy(), old["boxes"].numpy())
        if combo in ("hflip", "vflip", "hvflip", "resize_up"):  # every pixel is kept: no decoding
            assert not box_only_decoded
        elif combo in ("scale_up", "shift", "all"):  # only the cells the border cuts
            assert 0 < len(box_only_decoded) < 0.5 * n
            plan = pipeline.plan()  # fixed parameters: the same plan
            for i in box_only_decoded:
                alone = pipeline.apply(tv_tensors.Mask(torch.from_numpy(record.mask(i))[None]), plan)[0]
                touches = alone[0].any() or alone[-1].any() or alone[:, 0].any() or alone[:, -1].any()
                assert touches or not alone.any()  # cut by the border, or gone


@pytest.mark.parametrize("combo", ["all", "scale_down"])
def test_box_only_boxes_are_tight_boxes_of_the_target_masks(real_records, tight_boxes, combo):
    (record,) = [r for r in real_records if r.image_id == "01ae5a43a2ab"]
    pipeline = Pipeline(COMBOS[combo])
    _, plain = DetectionDataset([record], pipeline, min_area=1, min_size=0.5)[0]
    _, full = DetectionDataset([record], pipeline, with_masks=True, min_area=1, min_size=0.5)[0]
    np.testing.assert_array_equal(full["boxes"].numpy(), tight_boxes(full["masks"].dense().numpy()))
    np.testing.assert_array_equal(plain["boxes"].numpy(), full["boxes"].numpy())
    assert torch.equal(plain["labels"], full["labels"])


def test_paper_pipeline_decodes_exactly_the_rotated_samples(real_records, decoded):
    (record,) = [r for r in real_records if r.image_id == "01ae5a43a2ab"]
    pipeline = build_transforms(None, train=True)
    dataset = DetectionDataset([record], pipeline)
    rotated = 0
    for seed in range(16):
        torch.manual_seed(seed)
        rotates = pipeline.plan().rotates
        rotated += rotates
        decoded.clear()
        torch.manual_seed(seed)
        dataset[0]
        assert len(decoded) == (len(record) if rotates else 0)
    assert 0 < rotated < 16  # both kinds were drawn (p 0.4)
    # with_masks decodes every sample
    decoded.clear()
    DetectionDataset([record], pipeline, with_masks=True)[0]
    assert len(decoded) == len(record)


def test_random_axis_aligned_draws_match_the_masks_path(real_records, augment_only, tight_boxes):
    """The config path: random flips and shift-scale without rotation (shrinking and enlarging)."""
    cfg = augment_only(hflip=0.5, vflip=0.5, shift_scale_rotate={"p": 1.0, "rotate": 0, "scale": 0.15})
    pipeline = build_transforms(cfg, train=True)
    (record,) = [r for r in real_records if r.image_id == "0a6ecc5fe78a"]
    for seed in range(4):
        torch.manual_seed(seed)
        assert not pipeline.plan().rotates
        torch.manual_seed(seed)
        _, plain = DetectionDataset([record], pipeline, min_area=1, min_size=0.5)[0]
        torch.manual_seed(seed)
        _, full = DetectionDataset([record], pipeline, with_masks=True, min_area=1, min_size=0.5)[0]
        np.testing.assert_array_equal(full["boxes"].numpy(), tight_boxes(full["masks"].dense().numpy()))
        np.testing.assert_array_equal(plain["boxes"].numpy(), full["boxes"].numpy())
