"""RLE codec: round trips (property-based and on every real train.csv row), orientation, errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as mask_utils

from cellmask.data.images import read_image
from cellmask.data.rle import (
    masks_to_rles,
    rle_area,
    rle_box,
    rle_decode,
    rle_encode,
    rle_to_coco,
    rle_to_runs,
    rles_to_label_image,
    rles_to_masks,
    runs_to_indices,
)

H, W = 520, 704

masks_2d = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
    lambda hw: arrays(np.bool_, hw, elements=st.booleans())
)


@settings(max_examples=300, deadline=None)
@given(masks_2d)
def test_round_trip_property(mask):
    rle = rle_encode(mask)
    decoded = rle_decode(rle, *mask.shape)
    assert decoded.dtype == bool and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)
    assert rle_area(rle, *mask.shape) == mask.sum()
    if mask.any():
        ys, xs = np.nonzero(mask)
        np.testing.assert_array_equal(
            rle_box(rle, *mask.shape), [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        )


@settings(max_examples=200, deadline=None)
@given(masks_2d)
def test_encoding_is_canonical_row_major(mask):
    """Starts are 1-indexed row-major pixel numbers and runs never touch (merged)."""
    tokens = [int(t) for t in rle_encode(mask).split()]
    starts, lengths = np.array(tokens[0::2]), np.array(tokens[1::2])
    assert (lengths > 0).all()
    if len(starts) > 1:
        assert (starts[1:] > starts[:-1] + lengths[:-1]).all()
    flat = mask.ravel(order="C")
    for s, n in zip(starts, lengths, strict=True):
        assert flat[s - 1 : s - 1 + n].all()


def test_known_small_case():
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 1:3] = True  # pixels 2, 3
    mask[1, 3] = True  # pixel 8
    mask[2, 0] = True  # pixel 9: touches pixel 8 across the row end -> one run
    assert rle_encode(mask) == "2 2 8 2"
    np.testing.assert_array_equal(rle_decode("2 2 8 2", 3, 4), mask)
    # the wrapping run spans the whole width, so the box does too
    np.testing.assert_array_equal(rle_box("8 2", 3, 4), [0, 1, 4, 3])


def test_empty_mask():
    assert rle_encode(np.zeros((5, 6), bool)) == ""
    assert not rle_decode("", 5, 6).any()
    assert not rle_decode("   ", 5, 6).any()


def test_every_real_row_round_trips_byte_for_byte(real_rows):
    assert len(real_rows) == 1167
    for i, row in enumerate(real_rows):
        h, w = int(row["height"]), int(row["width"])
        mask = rle_decode(row["annotation"], h, w)
        assert mask.any(), f"row {i} decodes empty"
        assert rle_encode(mask) == row["annotation"], f"row {i} ({row['id']}) differs after a round trip"


def test_batch_helpers_on_real_rows(real_records):
    rec = real_records[2]
    masks = rles_to_masks(rec.segmentations, rec.height, rec.width)
    assert masks.shape == (len(rec), H, W)
    assert masks_to_rles(masks) == rec.segmentations
    labels = rles_to_label_image(rec.segmentations, rec.height, rec.width)
    assert labels.dtype == np.int32 and labels.max() == len(rec)
    np.testing.assert_array_equal(labels > 0, masks.any(0))
    # the last instance is painted last, so all its pixels carry its label
    assert (labels[masks[-1]] == len(rec)).all()


def test_coco_conversion_is_the_transpose(real_records):
    """A row-major RLE of H x W is pycocotools' column-major RLE of the W x H transpose."""
    rec = real_records[0]
    for rle in rec.segmentations[:25]:
        coco = mask_utils.frPyObjects(rle_to_coco(rle, rec.height, rec.width), rec.width, rec.height)
        decoded = mask_utils.decode(coco).astype(bool)  # W x H
        np.testing.assert_array_equal(decoded.T, rle_decode(rle, rec.height, rec.width))
        assert mask_utils.area(coco) == rle_area(rle, rec.height, rec.width)


def _gradient_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    img = image.astype(np.float32)
    grad = np.hypot(cv2.Sobel(img, cv2.CV_32F, 1, 0), cv2.Sobel(img, cv2.CV_32F, 0, 1))
    return float(grad[mask].mean() / grad[~mask].mean())


def test_orientation_on_real_images(real_records):
    """Cells are textured, background is flat: decoded masks must sit on the cells.

    A column-major decoder (pixels numbered down columns) scatters the same runs over the image,
    where the gradient inside and outside the masks is the same; row-major decoding puts at least
    twice the gradient inside.
    """
    for rec in real_records:
        image = read_image(rec.path, (rec.height, rec.width))
        union = rec.masks().any(0)
        wrong = np.zeros(rec.height * rec.width, dtype=bool)
        for rle in rec.segmentations:
            wrong[runs_to_indices(*rle_to_runs(rle, rec.height, rec.width))] = True
        wrong = wrong.reshape(rec.width, rec.height).T  # what a column-major decoder would produce
        right_ratio, wrong_ratio = _gradient_contrast(image, union), _gradient_contrast(image, wrong)
        assert right_ratio > 2.0, (rec.image_id, right_ratio)
        assert 0.8 < wrong_ratio < 1.3, (rec.image_id, wrong_ratio)


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 2 3", "odd number of tokens"),
        ("1 x", "'x' is not an integer"),
        ("1 2.5", "not an integer"),
        ("1 99999999999999999999", "too large"),
        ("0 3", "start 0 is < 1"),
        ("5 0", "length 0 is not positive"),
        ("5 -2", "length -2 is not positive"),
        ("11 3", "ends beyond the image"),
        ("7 1 2 1", "unsorted"),
        ("2 3 4 1", "overlapping"),
    ],
)
def test_malformed_rle_errors(rle, message):
    with pytest.raises(ValueError, match=message):
        rle_decode(rle, 3, 4)


def test_touching_runs_are_accepted_and_merged():
    mask = rle_decode("1 2 3 2", 2, 3)
    assert mask.ravel().tolist() == [True, True, True, True, False, False]
    assert rle_encode(mask) == "1 4"


def test_bad_mask_shape():
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros((2, 3, 4), bool))
