"""How flip TTA enters WBF (``predict.tta_fusion``): the 8-entry reading (``views``) against the
paper's (``per_model``: each branch's views merged first), with scores derived by hand.

WBF's ``avg`` score of a cluster (no more boxes than models) is ``sum(w x s) / sum(all weights)``
and its box the ``w x s``-weighted mean of the clustered boxes; boxes are clustered greedily in
descending ``w x s`` order, a box joining the cluster it overlaps most when that IoU exceeds
``iou_thr`` (0.6). Every box below spans rows 0..10, so IoUs are those of the column spans.
"""

from __future__ import annotations

import numpy as np
import pytest
from _predict_helpers import BlobDetector, ContentSegmenter

from cellmask.errors import DataError
from cellmask.predict import Branch, Detections, Predictor, predict_config
from cellmask.predict.fusion import fuse_branches

SIZE = (100, 100)


def _box(x0: float, x1: float, score: float, label: int = 1) -> Detections:
    return Detections([[x0, 0.0, x1, 10.0]], [score], [label])


def _empty() -> Detections:
    return Detections.empty()


def _both(branches, weights) -> dict[str, Detections]:
    return {mode: fuse_branches(branches, weights, SIZE, tta_fusion=mode) for mode in ("views", "per_model")}


def _sorted(det: Detections) -> list[tuple[float, list[float]]]:
    return sorted(((float(s), b.tolist()) for s, b in zip(det.scores, det.boxes, strict=True)), reverse=True)


def _table(det: Detections) -> np.ndarray:
    """``[K, 5]`` rows (score, box), by descending score then left edge: comparable arrays."""
    rows = np.column_stack([det.scores.astype(np.float64), det.boxes])
    return rows[np.lexsort((rows[:, 1], -rows[:, 0]))]


def test_one_view_boxes_score_the_same_in_both_readings_when_the_clusters_coincide():
    # branch A (weight 2) sees cell X in the identity view only (0.8) and cell Y in the flipped
    # view only (0.9); branch B (weight 1) sees X in both views (0.6, 0.4), Y in none
    a = [Detections([[10, 0, 30, 10]], [0.8], [1]), Detections([[50, 0, 70, 10]], [0.9], [1])]
    b = [_box(10, 30, 0.6), _box(10, 30, 0.4)]
    fused = _both([a, b], [2.0, 1.0])
    # views: 4 entries, weights 2, 2, 1, 1 (sum 6):
    #   X = (2 x 0.8 + 1 x 0.6 + 1 x 0.4) / 6 = 2.6 / 6;  Y = 2 x 0.9 / 6 = 0.3
    # per_model: A's views merged with weights 1, 1 (sum 2): X 0.8 / 2 = 0.4, Y 0.9 / 2 = 0.45;
    #   B's: X (0.6 + 0.4) / 2 = 0.5; then the branches, weights 2, 1 (sum 3):
    #   X = (2 x 0.4 + 1 x 0.5) / 3 = 1.3 / 3 = 2.6 / 6;  Y = 2 x 0.45 / 3 = 0.3
    for mode, det in fused.items():
        got = _sorted(det)
        assert [s for s, _ in got] == pytest.approx([2.6 / 6, 0.3], abs=1e-6), mode
        assert got[0][1] == pytest.approx([10, 0, 30, 10], abs=1e-3)
        assert got[1][1] == pytest.approx([50, 0, 70, 10], abs=1e-3)
    # a box seen in one view only gets half of what both views give, in either reading: Y seen
    # by A in both views would score 2 x 0.9 x 2 / 6 = 0.6
    both_views = _both([[a[1], a[1]], [_empty(), _empty()]], [2.0, 1.0])
    assert all(float(d.scores[0]) == pytest.approx(0.6, abs=1e-6) for d in both_views.values())


def test_per_model_keeps_a_cell_together_where_one_wbf_call_splits_a_branchs_views():
    # branch A (weight 2): identity a1 = cols 0..10 (0.9), flipped a2 = cols 2..12 (0.8);
    #   IoU(a1, a2) = 8 / 12 = 0.67 (> 0.6)
    # branch B (weight 3): identity b1 = cols 3..13 (0.9), nothing in the flipped view;
    #   IoU(a1, b1) = 7 / 13 = 0.54 (< 0.6), IoU(a2, b1) = 9 / 11 = 0.82
    a = [_box(0, 10, 0.9), _box(2, 12, 0.8)]
    b = [_box(3, 13, 0.9), _empty()]
    fused = _both([a, b], [2.0, 3.0])

    # views (weights 2, 2, 3, 3; sum 10), in w x s order: b1 (2.7) opens a cluster; a1 (1.8)
    # overlaps it by 0.54 only and opens its own; a2 (1.6) overlaps b1's by 0.82 (a1's by 0.67)
    # and joins b1. One cell, two boxes:
    #   {b1, a2}: (2.7 + 1.6) / 10 = 0.43, cols (2.7 x 3 + 1.6 x 2) / 4.3 .. (2.7 x 13 + 1.6 x 12) / 4.3
    #   {a1}:     1.8 / 10 = 0.18
    views = _sorted(fused["views"])
    assert [s for s, _ in views] == pytest.approx([0.43, 0.18], abs=1e-6)
    assert views[0][1] == pytest.approx([11.3 / 4.3, 0, 54.3 / 4.3, 10], abs=1e-3)
    assert views[1][1] == pytest.approx([0, 0, 10, 10], abs=1e-3)

    # per_model: A's views merge (IoU 0.67): score (0.9 + 0.8) / 2 = 0.85, cols
    #   (0.8 x 2) / 1.7 .. (0.9 x 10 + 0.8 x 12) / 1.7 = 0.941 .. 10.941; B's one view: 0.9 / 2 = 0.45.
    # Branches (weights 2, 3; sum 5): A (1.7) first, B (1.35) overlaps it by 7.941 / 12.059 =
    # 0.66 and joins: one box, (1.7 + 1.35) / 5 = 0.61, cols (1.6 + 1.35 x 3) / 3.05 ..
    # (18.6 + 1.35 x 13) / 3.05
    per_model = _sorted(fused["per_model"])
    assert [s for s, _ in per_model] == pytest.approx([0.61], abs=1e-6)
    assert per_model[0][1] == pytest.approx([5.65 / 3.05, 0, 36.15 / 3.05, 10], abs=1e-3)


def test_per_model_does_not_cut_a_cell_whose_branch_views_disagree():
    # branch A (weight 1): a1 = cols 0..10 (0.8), a2 = cols 3..13 (0.8); IoU 7 / 13 = 0.54, so
    #   A's merge keeps them apart: two boxes at 0.8 / 2 = 0.4
    # branch B (weight 1): cols 1.5..11.5 at 0.9 in both views: one box at 0.9
    a = [_box(0, 10, 0.8), _box(3, 13, 0.8)]
    b = [_box(1.5, 11.5, 0.9), _box(1.5, 11.5, 0.9)]
    fused = _both([a, b], [1.0, 1.0])
    # per_model's branches (sum of weights 2): B opens; a1 overlaps it by 8.5 / 11.5 = 0.74 and
    #   joins, a2 overlaps the cluster's box (1.04..11.04) by 0.67 and joins: three boxes for two
    #   models. WBF's cap would score it mean(0.9, 0.4, 0.4) x 2 / 2 = 0.567; uncapped it is
    #   (0.9 + 0.4 + 0.4) / 2 = 0.85, what one call over the 4 views gives:
    #   (0.9 + 0.9 + 0.8 + 0.8) / 4 = 0.85, box cols 1.5..11.5 in both
    for mode, det in fused.items():
        got = _sorted(det)
        assert [s for s, _ in got] == pytest.approx([0.85], abs=1e-6), mode
        assert got[0][1] == pytest.approx([1.5, 0, 11.5, 10], abs=1e-3), mode
    # without TTA (one view per branch) the branches' WBF keeps the library's cap
    no_tta = fuse_branches([[a[0]], [a[1]], [b[0]]], [1.0, 1.0, 1.0], SIZE, tta_fusion="per_model")
    assert float(no_tta.scores.max()) <= 1.0
    # a branch with duplicates in both views never scores a cell above 1
    dup = [Detections([[0, 0, 10, 10], [0, 0, 9.6, 10]], [0.95, 0.9], [1, 1])] * 2
    assert float(fuse_branches([dup, b], [1.0, 1.0], SIZE, tta_fusion="per_model").scores.max()) <= 1.0


def test_per_model_drops_a_one_view_box_under_twice_skip_box_thr():
    # skip_box_thr 0.01 meets the raw score in `views` and the view-averaged one in `per_model`
    a = [_box(0, 10, 0.015), _empty()]
    b = [_box(50, 60, 0.9), _box(50, 60, 0.9)]
    fused = _both([a, b], [1.0, 1.0])
    assert len(fused["views"]) == 2 and len(fused["per_model"]) == 1
    assert min(fused["views"].scores) == pytest.approx(0.015 / 4, abs=1e-7)  # 1 x 0.015 / (2 + 2)


def _spy_wbf(monkeypatch) -> list[dict]:
    import ensemble_boxes

    calls: list[dict] = []
    real = ensemble_boxes.weighted_boxes_fusion

    def spy(boxes_list, scores_list, labels_list, **kwargs):
        calls.append({"boxes": [np.array(b) for b in boxes_list], **kwargs})
        return real(boxes_list, scores_list, labels_list, **kwargs)

    monkeypatch.setattr(ensemble_boxes, "weighted_boxes_fusion", spy)
    return calls


def _paper_predictor(tta_fusion: str) -> Predictor:
    names_weights = [("swin", 2.0), ("resnext", 3.0), ("resnest", 3.0), ("soft teacher", 1.0)]
    branches = [Branch(n, BlobDetector(), weight=w) for n, w in names_weights]
    return Predictor(branches, ContentSegmenter(), {"device": "cpu", "tta_fusion": tta_fusion})


def _paper_raw() -> dict[str, list[Detections]]:
    """Each of the four branches alone finds one cell, in both views at 0.8."""
    return {
        name: [_box(20 * k, 20 * k + 10, 0.8), _box(20 * k, 20 * k + 10, 0.8)]
        for k, name in enumerate(("swin", "resnext", "resnest", "soft teacher"))
    }


def test_per_model_applies_the_papers_weights_once_per_branch(monkeypatch):
    calls = _spy_wbf(monkeypatch)
    fused = _paper_predictor("per_model").fuse(_paper_raw(), SIZE)
    # four merges of a branch's two views with equal weights, then the branches with 2, 3, 3, 1
    assert [c["weights"] for c in calls] == [[1.0, 1.0]] * 4 + [[2.0, 3.0, 3.0, 1.0]]
    assert all(c["iou_thr"] == 0.6 and c["skip_box_thr"] == 0.01 and c["conf_type"] == "avg" for c in calls)
    np.testing.assert_allclose(calls[1]["boxes"][0], [[0.2, 0.0, 0.3, 0.1]])  # branch 2's own view
    # a cell found by one branch only, in both views: weight x 0.8 / (2 + 3 + 3 + 1)
    by_x0 = {round(float(b[0])): float(s) for b, s in zip(fused.boxes, fused.scores, strict=True)}
    assert by_x0 == pytest.approx({0: 1.6 / 9, 20: 2.4 / 9, 40: 2.4 / 9, 60: 0.8 / 9}, abs=1e-6)

    calls.clear()
    views = _paper_predictor("views").fuse(_paper_raw(), SIZE)
    assert [c["weights"] for c in calls] == [[2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 1.0, 1.0]]
    np.testing.assert_allclose(_table(views), _table(fused), atol=1e-5)  # same clusters, same result


def test_one_branch_is_the_same_fusion_in_both_readings():
    views = [_box(0, 10, 0.9), _box(1, 11, 0.7)]
    fused = _both([views], [3.0])
    np.testing.assert_allclose(_table(fused["views"]), _table(fused["per_model"]), atol=1e-5)
    assert float(fused["views"].scores[0]) == pytest.approx(0.8, abs=1e-6)  # (0.9 + 0.7) / 2


def test_class_vote_before_wbf_relabels_every_view_in_both_readings():
    predictor = Predictor(
        [Branch("a", BlobDetector(), weight=2.0), Branch("b", BlobDetector(), weight=1.0)],
        ContentSegmenter(),
        {"device": "cpu", "vote_before_wbf": True},
    )
    raw = {  # one cell: a says cort in both views, b astro in one view
        "a": [_box(10, 30, 0.9, 2), _box(10, 30, 0.8, 2)],
        "b": [_box(11, 31, 0.6, 3), _empty()],
    }
    for mode in ("views", "per_model"):
        opts = predict_config({**predictor.options, "tta_fusion": mode})
        fused = predictor.fuse(raw, SIZE, options=opts)
        assert fused.labels.tolist() == [2], mode  # one box, voted cort
        # (2 x 0.9 + 2 x 0.8 + 1 x 0.6) / 6 in both readings
        assert float(fused.scores[0]) == pytest.approx(4.0 / 6, abs=1e-6), mode


def test_unknown_tta_fusion_is_an_error():
    with pytest.raises(DataError, match="tta_fusion"):
        predict_config({"tta_fusion": "mean"})
    with pytest.raises(ValueError, match="tta_fusion"):
        fuse_branches([[_box(0, 10, 0.9)], [_box(0, 10, 0.9)]], [1, 1], SIZE, tta_fusion="mean")
