"""Augmentation pipeline: config parsing, the ops (border modes, blurs), label layers, determinism."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision import tv_tensors

from cellmask.config import load_config
from cellmask.data.augment import AffineParams, Flip, ShiftScaleRotate
from cellmask.data.images import read_image
from cellmask.data.photometric import Blur, BlurChoice, BrightnessContrast
from cellmask.data.transforms import (
    DEFAULT_AUGMENT,
    Pipeline,
    apply_transforms,
    build_transforms,
    layers_to_boxes,
    layers_to_masks,
    masks_to_layers,
)

torch.set_num_threads(1)

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


def test_default_pipeline_is_the_authors():
    train = build_transforms(None, train=True)
    assert isinstance(train, Pipeline) and train.geometric
    assert [type(op).__name__ for op in train.ops] == [
        "Flip",
        "ShiftScaleRotate",
        "BrightnessContrast",
        "Blur",
    ]
    flip, ssr, bc, blur = train.ops
    assert (flip.axis, flip.p) == ("horizontal", 0.5)  # no vertical flip by default
    assert (ssr.p, ssr.shift, ssr.scale, ssr.rotate, ssr.border) == (0.4, 0.0625, 0.15, 15.0, "reflect")
    assert (bc.p, bc.brightness, bc.contrast) == (0.5, 0.2, 0.2)
    assert blur.gaussian == BlurChoice(0.2, (3, 5, 7), (0.0, 0.0)) and blur.median == BlurChoice(
        0.2, (3, 5, 7)
    )
    assert len(build_transforms({}, train=True).ops) == 4
    # evaluation: resize only, empty without a size
    ev = build_transforms(DEFAULT_AUGMENT, train=False)
    assert not ev.geometric and ev.ops == []
    ev = build_transforms({"resize": [256, 320]}, train=False)
    assert ev.geometric and [type(op).__name__ for op in ev.ops] == ["Resize"]


def test_base_yaml_states_the_defaults_and_the_demo_profile_builds():
    assert load_config(BASE)["augment"] == DEFAULT_AUGMENT  # one set of values, stated in both
    demo = build_transforms(load_config(BASE, "demo")["augment"], train=True)
    assert [(type(op).__name__, op.axis) for op in demo.ops] == [("Flip", "horizontal"), ("Flip", "vertical")]


def test_partial_sections_merge_and_switch_off(augment_only):
    p = build_transforms(augment_only(shift_scale_rotate={"p": 1.0, "rotate": 10}), train=True)
    (ssr,) = p.ops
    assert isinstance(ssr, ShiftScaleRotate) and ssr.rotate == 10 and ssr.p == 1.0
    assert ssr.shift == 0.0625 and ssr.border == "reflect"  # defaults kept
    photometric = build_transforms(augment_only(brightness_contrast={"p": 1}, median_blur={"p": 0.3}), True)
    assert not photometric.geometric and len(photometric.ops) == 2
    (blur,) = build_transforms(augment_only(median_blur={"p": 0.3, "kernel": 5}), True).ops
    assert blur.gaussian is None and blur.median == BlurChoice(0.3, (5,))
    assert build_transforms(augment_only(gaussian_blur={"p": 0}), True).ops == []


@pytest.mark.parametrize(
    "cfg",
    [
        {"hlfip": 0.5},
        {"hflip": 1.5},
        {"shift_scale_rotate": {"p": 0.5, "rotation": 3}},
        {"shift_scale_rotate": {"border": "wrap"}},
        {"median_blur": {"p": -0.1}},
        {"median_blur": {"kernel": 4}},
        {"median_blur": {"kernel": [3, 8]}},
        {"gaussian_blur": {"kernel": [7, 3]}},
        {"gaussian_blur": {"sigma": [2.0, 1.0]}},
        {"gaussian_blur": {"p": 0.6}, "median_blur": {"p": 0.6}},  # one of two: at most 1 in all
        {"resize": [520]},
        {"resize": 512},
        {"gaussian_blur": 0.3},
    ],
)
def test_bad_config_raises(cfg):
    with pytest.raises(ValueError, match="augment"):
        build_transforms(cfg, train=True)


def test_blur_is_one_of_two_with_odd_kernels_drawn_uniformly():
    blur = build_transforms(None, train=True).ops[-1]
    torch.manual_seed(0)
    draws = [blur.draw() for _ in range(4000)]
    kinds = Counter(d[0] if d else None for d in draws)
    # albumentations OneOf([GaussianBlur, MedianBlur], p=0.4): 0.2 each, never both, 0.6 none
    assert abs(kinds["gaussian"] / 4000 - 0.2) < 0.025 and abs(kinds["median"] / 4000 - 0.2) < 0.025
    assert abs(kinds[None] / 4000 - 0.6) < 0.03
    for kind in ("gaussian", "median"):
        sizes = Counter(d[1] for d in draws if d and d[0] == kind)
        assert set(sizes) == {3, 5, 7} and min(sizes.values()) > 0.25 * kinds[kind]
    # a fixed size stays fixed
    fixed = Blur(BlurChoice(1.0, (5,), (1.0, 2.0)), None)
    assert {fixed.draw()[1] for _ in range(20)} == {5}


def test_blurs_are_opencvs(real_records):
    image = read_image(real_records[2].path)[:64, :96]
    planes = torch.from_numpy(image)[None]
    blur = Blur(BlurChoice(0.5, (3, 5, 7)), BlurChoice(0.5, (3, 5, 7)))
    for k in (3, 7):
        out = blur.image(planes, ("median", k, 0.0))
        assert out.dtype == torch.uint8
        np.testing.assert_array_equal(out[0].numpy(), cv2.medianBlur(image, k))
        # sigma 0: OpenCV's kernel for the size (albumentations' GaussianBlur(blur_limit=7) default)
        kernel = cv2.getGaussianKernel(k, 0)
        expected = cv2.filter2D(
            image.astype(np.float64), -1, kernel @ kernel.T, borderType=cv2.BORDER_REFLECT_101
        )
        got = blur.image(planes, ("gaussian", k, 0.0))[0].numpy().astype(np.float64)
        assert np.abs(got - expected).max() <= 1.0
        assert np.abs(got - image).mean() > 1.0
    as_float = blur.image(planes.float() / 255, ("median", 3, 0.0))
    assert as_float.dtype == torch.float32
    np.testing.assert_allclose(as_float[0].numpy() * 255, cv2.medianBlur(image, 3), atol=0.51)


def test_brightness_contrast_is_albumentations_formula():
    image = torch.arange(0, 256, dtype=torch.uint8).reshape(1, 16, 16)
    out = BrightnessContrast(1.0, 0.2, 0.3).image(image, (1.25, -0.2))
    expected = np.clip(np.arange(256) * 1.25 - 51, 0, 255).round().reshape(1, 16, 16)
    np.testing.assert_array_equal(out.numpy(), expected)


def _textured(height=32, width=48, seed=0):
    return np.random.default_rng(seed).integers(60, 250, (height, width), dtype=np.uint8)


@pytest.mark.parametrize("border", ["reflect", "constant"])
def test_shift_scale_rotate_border(border):
    image = _textured()
    ones = torch.ones((1, 32, 48), dtype=torch.int32)
    op = ShiftScaleRotate(1.0, 0.25, 0.0, 0.0, border=border, fill=7)
    shift = AffineParams(angle=0.0, scale=1.0, dx=0.25, dy=0.0)  # 12 px to the right
    out = op.image(torch.from_numpy(image)[None], shift)[0].numpy()
    np.testing.assert_array_equal(out[:, 12:], image[:, :-12])
    if border == "reflect":  # cv2.BORDER_REFLECT_101 = numpy's "reflect": edge column not repeated
        np.testing.assert_array_equal(out[:, :12], np.pad(image, ((0, 0), (12, 0)), mode="reflect")[:, :12])
    else:
        assert (out[:, :12] == 7).all()
    mask = op.layers(ones, shift)[0].numpy()
    assert (mask[:, :12] == 0).all() and (mask[:, 12:] == 1).all()  # masks are never reflected
    # a rotation uncovers the corners: mirrored image content or the fill; masks 0 there
    turn = AffineParams(angle=30.0, scale=1.0, dx=0.0, dy=0.0)
    out = op.image(torch.from_numpy(image)[None], turn)[0].numpy()
    mask = op.layers(ones, turn)[0].numpy()
    corners = np.s_[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (mask[corners] == 0).all() and mask[16, 24] == 1
    if border == "reflect":
        assert (out[corners] >= 60).all()
    else:
        assert (out[corners] == 7).all()


def test_flip_and_affine_keep_other_inputs_and_structure():
    image = tv_tensors.Image(torch.from_numpy(_textured())[None])
    labels = torch.tensor([3, 4])
    out = Pipeline([Flip("horizontal", 1.0)])({"image": image, "labels": labels})
    assert isinstance(out["image"], tv_tensors.Image) and out["labels"] is labels
    np.testing.assert_array_equal(out["image"][0].numpy(), image[0].numpy()[:, ::-1])
    plain = Pipeline([Flip("vertical", 1.0)])(image.as_subclass(torch.Tensor))
    assert type(plain) is torch.Tensor and torch.equal(plain, image.as_subclass(torch.Tensor).flip(-2))


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


def test_crop_is_a_native_window_with_exact_boxes(real_records, augment_only):
    """augment.crop: a 256x256 window at native resolution (training only); pixels are the
    image's own, and each cell's box is the tight box of its mask inside the window (cut cells
    included), from the sampled pixels, never from an H x W stack of masks."""
    from cellmask.data.datasets import DetectionDataset

    record = max(real_records, key=len)  # the crowded shsy5y image
    pipe = build_transforms(augment_only(crop=[256, 256]), train=True)
    assert [type(op).__name__ for op in pipe.ops] == ["Crop"] and pipe.geometric
    assert build_transforms(augment_only(crop=[256, 256]), train=False).ops == []  # whole images
    ds = DetectionDataset([record], pipe, with_masks=True)
    image = read_image(record.path, (record.height, record.width))
    masks = record.masks() if hasattr(record, "masks") else None
    for seed in range(3):
        torch.manual_seed(seed)
        plan = pipe.plan()
        (fy, fx) = plan.steps[0][1]
        top, left = int(fy * (record.height - 256 + 1)), int(fx * (record.width - 256 + 1))
        torch.manual_seed(seed)
        img, target = ds[0]
        assert img.shape[-2:] == (256, 256)
        window = image[top : top + 256, left : left + 256]
        assert torch.equal((img[0] * 255).round().to(torch.uint8), torch.from_numpy(window))
        got = target["masks"].dense().numpy().astype(bool)
        assert len(got) > 20  # a crowded window keeps many cells
        for m, box in zip(got, target["boxes"].numpy(), strict=True):
            yy, xx = np.nonzero(m)
            assert list(box) == [xx.min(), yy.min(), xx.max() + 1, yy.max() + 1]
        if masks is not None:  # every cut cell the dataset's size rules keep
            cut = masks[:, top : top + 256, left : left + 256]
            kept = 0
            for m in cut[cut.reshape(len(cut), -1).any(1)]:
                yy, xx = np.nonzero(m)
                w, h = xx.max() + 1 - xx.min(), yy.max() + 1 - yy.min()
                kept += int(min(w, h) >= ds.min_size and len(yy) >= max(ds.min_area, 1))
            assert kept == len(got)
    with pytest.raises(ValueError, match="augment.crop"):
        build_transforms({"crop": [0, 10]}, train=True)
