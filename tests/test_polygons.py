"""COCO polygons to pixels without full-frame masks: exactly pycocotools' full-frame rasterisation.

The 4 real LIVECell fixture images carry no annotations (tests/fixtures/sartorius_real/README.md),
so the real polygons here are the outlines of the 6 real competition images' cells, with
LIVECell-like sub-pixel coordinates, plus random polygons that touch and cross the border.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from cellmask.data.polygons import coco_counts, coco_counts_to_indices, polygon_indices, polygons_to_mask
from cellmask.data.records import ImageRecord


def full_frame(polygons, height, width) -> np.ndarray:
    """The reference: pycocotools' full-frame mask, flat row-major indices."""
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return np.flatnonzero(mask_utils.decode(mask_utils.merge(rles)))


@pytest.fixture(scope="module")
def real_outlines(real_records) -> list[list[np.ndarray]]:
    """Every 3rd real cell's outer contour(s) as COCO polygons, jittered to 2-decimal coordinates
    (where rasterising a polygon shifted into a window would differ from the full frame)."""
    rng = np.random.default_rng(0)
    outlines = []
    for record in real_records:
        for i in range(0, len(record), 3):
            ys, xs = np.divmod(record.indices(i), record.width)
            window = np.zeros((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1), dtype=np.uint8)
            window[ys - ys.min(), xs - xs.min()] = 1
            contours, _ = cv2.findContours(
                window, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(int(xs.min()), int(ys.min()))
            )
            polygons = [c.reshape(-1).astype(np.float64) for c in contours if len(c) >= 3]
            if polygons:
                outlines.append([(p + rng.uniform(-0.5, 0.5, p.shape)).round(2) for p in polygons])
    return outlines


def test_real_outlines_match_pycocotools_full_frame(real_outlines):
    assert len(real_outlines) > 350
    for polygons in real_outlines:
        np.testing.assert_array_equal(polygon_indices(polygons, 520, 704), full_frame(polygons, 520, 704))


coordinate = st.floats(-0.3, 1.3).map(lambda v: round(v, 2))  # in units of the image size


@settings(max_examples=150, deadline=None)
@given(
    size=st.tuples(st.integers(1, 90), st.integers(1, 90)),
    polygons=st.lists(
        st.lists(st.tuples(coordinate, coordinate), min_size=3, max_size=9), min_size=1, max_size=3
    ),
)
def test_random_polygons_including_the_border_match_pycocotools(size, polygons):
    height, width = size
    coco = [[c for x, y in p for c in (x * width, y * height)] for p in polygons]
    expected = full_frame(coco, height, width)
    got = polygon_indices(coco, height, width)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.flatnonzero(polygons_to_mask(coco, height, width)), expected)


def test_polygons_crossing_every_border():
    height, width = 40, 56
    cases = [
        [[-5.5, -3.2, 20.0, -4.0, 10.3, 12.7]],  # top-left corner, outside on two sides
        [[50.1, 30.0, 70.0, 35.5, 52.3, 47.9]],  # bottom-right, mostly outside
        [[-10.0, 20.0, 70.0, 18.0, 69.0, 22.5, -9.0, 23.0]],  # a band across the whole width
        [[-1.0, -1.0, 60.0, -1.0, 60.0, 45.0, -1.0, 45.0]],  # covers the whole image
        [[100.0, 100.0, 120.0, 100.0, 110.0, 120.0]],  # entirely outside
    ]
    for coco in cases:
        np.testing.assert_array_equal(polygon_indices(coco, height, width), full_frame(coco, height, width))
    assert len(polygon_indices(cases[3], height, width)) == height * width
    assert len(polygon_indices(cases[4], height, width)) == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 70), st.integers(1, 70), st.floats(0.0, 1.0))
def test_coco_counts_decode_pycocotools_strings(seed, height, width, density):
    """Random masks (long runs, short runs, full and empty) through pycocotools' encoder."""
    mask = np.random.default_rng(seed).random((height, width)) < density
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = coco_counts(encoded["counts"])
    assert counts.sum() == height * width
    np.testing.assert_array_equal(coco_counts_to_indices(counts, height, width), np.flatnonzero(mask))


def test_polygon_record_indices_and_mask(tmp_path):
    polygons = [
        [[3.5, 2.0, 20.2, 4.0, 12.0, 18.7]],
        [[30.0, 5.0, 40.0, 5.0, 40.0, 15.0], [33.0, 20.0, 39.0, 20.0, 36.0, 26.0]],
    ]
    record = ImageRecord(
        image_id="p",
        path=tmp_path / "p.png",
        height=32,
        width=48,
        labels=np.array([1, 1]),
        segmentations=polygons,
        seg_format="polygon",
    )
    for i, p in enumerate(polygons):
        expected = full_frame(p, 32, 48)
        np.testing.assert_array_equal(record.indices(i), expected)
        np.testing.assert_array_equal(np.flatnonzero(record.mask(i)), expected)
