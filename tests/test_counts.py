"""Precision and recall at one IoU threshold per cell type (cellmask.evaluate.counts), on the real
fixture rows: the metric's own matching, checked against hand-built submissions."""

from __future__ import annotations

import numpy as np
import pytest

from cellmask.data.rle import rle_decode, rle_encode
from cellmask.evaluate.counts import match_counts
from cellmask.metric import iou_matrix


def test_truth_as_prediction_is_all_found_and_nothing_false(real_records):
    pred = {r.image_id: r.rles() for r in real_records}
    counts = match_counts(real_records, pred)
    assert set(counts) == {"shsy5y", "cort", "astro", "all"} and list(counts)[-1] == "all"
    total = sum(len(r) for r in real_records)
    # the real annotations hold a few near-duplicate cells (two truths at IoU > 0.5): a
    # prediction of each matches both, so they are neither TP nor FN (the metric's rule)
    twins = sum(
        int(((iou_matrix(r.rles(), r.rles(), r.height, r.width) > 0.5).sum(1) > 1).sum())
        for r in real_records
    )
    assert 0 < twins < 10
    c = counts["all"]
    assert c.truths == c.predictions == total and (c.tp, c.fp, c.fn) == (total - twins, 0, 0)
    assert c.precision == c.recall == 1.0
    assert sum(c.images for k, c in counts.items() if k != "all") == counts["all"].images == len(real_records)


def test_misses_false_cells_and_duplicates_are_told_apart(real_records):
    record = min(real_records, key=len)  # the sparsest image
    rles = record.rles()
    h, w = record.height, record.width
    shifted = []
    for rle in rles[:2]:  # two cells moved far away: each a miss (FN) and a false cell (FP)
        m = rle_decode(rle, h, w)
        shifted.append(rle_encode(np.roll(m, (h // 2, w // 2), axis=(0, 1))))
    pred = {record.image_id: [*rles[2:], rles[2], *shifted]}  # cell 2 predicted twice
    c = match_counts([record], pred)[record.cell_type]
    n = len(rles)
    # cell 2 matched twice: neither TP nor FN (the metric's rule), its two copies not FP
    assert (c.truths, c.predictions) == (n, n + 1)
    assert (c.tp, c.fn, c.fp) == (n - 3, 2, 2)
    assert c.precision == pytest.approx((n - 3) / (n - 1)) and c.recall == pytest.approx((n - 3) / (n - 1))
    empty = match_counts([record], {})[record.cell_type]
    assert (empty.tp, empty.fn, empty.fp) == (0, n, 0) and np.isnan(empty.precision) and empty.recall == 0.0
