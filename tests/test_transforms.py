"""Augmentation pipeline: config parsing, image-only ops, label layers, determinism."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision import tv_tensors
from torchvision.transforms import v2

from cellmask.data.images import read_image
from cellmask.data.transforms import (
    DEFAULT_AUGMENT,
    MedianBlur,
    Pipeline,
    apply_transforms,
    build_transforms,
    layers_to_boxes,
    layers_to_masks,
    masks_to_layers,
)

torch.set_num_threads(1)


def test_default_pipeline_is_the_papers():
    train = build_transforms(None, train=True)
    assert isinstance(train, Pipeline) and isinstance(train, v2.Compose) and train.geometric
    names = [
        type(t.transforms[0]).__name__ if isinstance(t, v2.RandomApply) else type(t).__name__
        for t in train.transforms
    ]
    assert names == [
        "RandomHorizontalFlip",
        "RandomVerticalFlip",
        "RandomAffine",
        "ColorJitter",
        "GaussianBlur",
        "MedianBlur",
    ]
    assert [t.p for t in train.transforms] == [0.5, 0.5, 0.5, 0.5, 0.1, 0.1]
    affine = train.transforms[2].transforms[0]
    assert list(affine.degrees) == [-45.0, 45.0] and tuple(affine.translate) == (0.0625, 0.0625)
    assert tuple(affine.scale) == pytest.approx((0.9, 1.1))
    assert build_transforms({}, train=True).transforms.__len__() == 6
    # evaluation: resize only, identity without a size
    ev = build_transforms(DEFAULT_AUGMENT, train=False)
    assert not ev.geometric and [type(t).__name__ for t in ev.transforms] == ["Identity"]
    ev = build_transforms({"resize": [256, 320]}, train=False)
    assert ev.geometric and [type(t).__name__ for t in ev.transforms] == ["Resize"]


def test_partial_sections_merge_and_switch_off(augment_only):
    p = build_transforms(augment_only(shift_scale_rotate={"p": 1.0, "rotate": 10}), train=True)
    (affine,) = p.transforms  # p == 1: no RandomApply wrapper
    assert isinstance(affine, v2.RandomAffine) and list(affine.degrees) == [-10.0, 10.0]
    assert tuple(affine.translate) == (0.0625, 0.0625)  # default kept
    photometric = build_transforms(augment_only(brightness_contrast={"p": 1}, median_blur={"p": 0.3}), True)
    assert not photometric.geometric and len(photometric.transforms) == 2
    assert not build_transforms(augment_only(gaussian_blur={"p": 0}), True).geometric


@pytest.mark.parametrize(
    "cfg",
    [
        {"hlfip": 0.5},
        {"hflip": 1.5},
        {"shift_scale_rotate": {"p": 0.5, "rotation": 3}},
        {"median_blur": {"p": -0.1}},
        {"resize": [520]},
        {"resize": 512},
        {"gaussian_blur": 0.3},
    ],
)
def test_bad_config_raises(cfg):
    with pytest.raises(ValueError, match="augment"):
        build_transforms(cfg, train=True)


def test_median_blur_matches_opencv_and_leaves_masks(real_records):
    image = read_image(real_records[2].path)[:64, :96]
    mask = tv_tensors.Mask(torch.randint(0, 5, (2, 64, 96), dtype=torch.int32))
    out_image, out_mask = MedianBlur(5)(tv_tensors.Image(torch.from_numpy(image)[None]), mask)
    assert isinstance(out_image, tv_tensors.Image) and out_image.dtype == torch.uint8
    np.testing.assert_array_equal(out_image[0].numpy(), cv2.medianBlur(image, 5))
    assert out_mask is mask or torch.equal(out_mask, mask)
    # plain tensors and float images too
    plain = MedianBlur(3)(torch.from_numpy(image)[None])
    np.testing.assert_array_equal(plain[0].numpy(), cv2.medianBlur(image, 3))
    as_float = MedianBlur(3)(torch.from_numpy(image)[None].float() / 255)
    assert as_float.dtype == torch.float32
    np.testing.assert_allclose(as_float[0].numpy() * 255, cv2.medianBlur(image, 3), atol=0.51)
    with pytest.raises(ValueError):
        MedianBlur(4)


def test_pipeline_is_deterministic_under_a_seed(real_records):
    record = real_records[2]
    image = read_image(record.path)
    masks = record.masks()
    pipeline = build_transforms({}, train=True)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append([apply_transforms(pipeline, image, masks, record.labels) for _ in range(3)])
    for a, b in zip(runs[0], runs[1], strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    assert any(not torch.equal(a[0], c[0]) for a, c in zip(runs[0], runs[2], strict=True))


def _rect_masks(rects, height=24, width=32):
    masks = np.zeros((len(rects), height, width), dtype=bool)
    for m, (x0, y0, w, h) in zip(masks, rects, strict=True):
        m[y0 : y0 + h, x0 : x0 + w] = True
    return masks


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 31), st.integers(0, 23), st.integers(1, 12), st.integers(1, 12)),
        min_size=0,
        max_size=12,
    )
)
def test_layers_roundtrip(tight_boxes, rects):
    masks = _rect_masks(rects)
    layers = masks_to_layers(masks)
    assert layers.dtype == np.int32 and layers.ndim == 3 and layers.shape[1:] == (24, 32)
    # each instance is in exactly one layer
    for i in range(len(masks)):
        assert sum(int((layer == i + 1).any()) for layer in layers) == 1
    np.testing.assert_array_equal(layers_to_masks(layers, len(masks)).numpy(), masks.astype(np.uint8))
    boxes, areas = layers_to_boxes(torch.from_numpy(layers), len(masks))
    np.testing.assert_array_equal(boxes.numpy(), tight_boxes(masks))
    np.testing.assert_array_equal(areas.numpy(), masks.sum((1, 2)))


def test_duplicated_masks_go_to_separate_layers():
    masks = _rect_masks([(2, 2, 5, 5), (2, 2, 5, 5), (20, 10, 4, 4)])
    layers = masks_to_layers(masks)
    assert len(layers) == 2
    np.testing.assert_array_equal(layers_to_masks(layers, 3).numpy(), masks)


def test_apply_transforms_flip_and_empty(augment_only):
    image = np.arange(24 * 32, dtype=np.uint8).reshape(24, 32)
    masks = _rect_masks([(0, 0, 4, 3), (10, 5, 6, 7)])
    out_image, out_masks, labels, boxes = apply_transforms(
        build_transforms(augment_only(hflip=1.0), True), image, masks, np.array([2, 3])
    )
    assert out_image.shape == (1, 24, 32) and out_image.dtype == torch.uint8
    np.testing.assert_array_equal(out_image[0].numpy(), image[:, ::-1])
    np.testing.assert_array_equal(out_masks.numpy(), masks[:, :, ::-1])
    assert labels.tolist() == [2, 3]
    np.testing.assert_array_equal(boxes.numpy(), [[28, 0, 32, 3], [16, 5, 22, 12]])
    # no instances
    out_image, out_masks, labels, boxes = apply_transforms(None, image, np.zeros((0, 24, 32), bool))
    assert out_masks.shape == (0, 24, 32) and labels.shape == (0,) and boxes.shape == (0, 4)
