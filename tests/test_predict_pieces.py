"""The ensemble's pieces on hand-made inputs: flip TTA, WBF at its boundary, the predict options,
the class vote, re-scoring, the detection cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _predict_helpers import BlobDetector, ContentSegmenter

from cellmask.predict import (
    PREDICT_DEFAULTS,
    Branch,
    DetectionCache,
    Detections,
    ImageKey,
    Predictor,
    flip_boxes,
    fuse_detections,
    image_class,
    load_predict_config,
    predict_config,
    run_detector,
)
from cellmask.predict.tta import views_for

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(height=48, width=64, rects=((5, 9, 10, 20), (30, 40, 41, 63)), value=230, dim=()) -> np.ndarray:
    """uint8 image with bright rectangles (rows y0:y1, cols x0:x1) and dim ones."""
    image = np.zeros((height, width), dtype=np.uint8)
    for y0, y1, x0, x1 in rects:
        image[y0:y1, x0:x1] = value
    for y0, y1, x0, x1 in dim:
        image[y0:y1, x0:x1] = 120
    return image


def _tensor(image: np.ndarray) -> torch.Tensor:
    from cellmask.data.datasets import image_to_tensor

    return image_to_tensor(image)


# ------------------------------------------------------------------------------ flip TTA


def test_flip_boxes_is_the_pixel_edge_mirror_and_its_own_inverse(tight_boxes):
    width = 64
    masks = np.zeros((2, 8, width), dtype=bool)
    masks[0, 2:5, 0:7] = True  # columns 0..6 -> box edges 0 and 7
    masks[1, 3:6, 50:64] = True  # columns 50..63 -> edges 50 and 64 (the right border)
    boxes = tight_boxes(masks)
    np.testing.assert_array_equal(boxes, [[0, 2, 7, 5], [50, 3, 64, 6]])
    np.testing.assert_array_equal(flip_boxes(boxes, width), tight_boxes(masks[:, :, ::-1]))
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, width, (100, 2)), axis=1).astype(np.float32)
    b = np.stack([x[:, 0], np.zeros(100), x[:, 1], np.ones(100)], 1)
    assert np.array_equal(flip_boxes(flip_boxes(b, width), width), b.astype(np.float64))


def test_tta_unflips_boxes_exactly():
    image = _blobs()
    det = BlobDetector()
    views = run_detector(det, [_tensor(image)], views_for(True))[0]
    assert len(views) == 2 and len(views[0]) == 2
    # the detector sees the mirrored image in the second view: its raw boxes differ ...
    raw = det([torch.flip(_tensor(image), dims=[-1])])[0]["boxes"].numpy()
    assert not np.array_equal(np.sort(raw, axis=0), np.sort(views[0].boxes, axis=0))
    # ... and un-flipped they are exactly the boxes of the unflipped image
    order = [np.lexsort(v.boxes.T[::-1]) for v in views]
    np.testing.assert_array_equal(views[1].boxes[order[1]], views[0].boxes[order[0]])
    np.testing.assert_array_equal(views[0].boxes[order[0]], [[10, 5, 20, 9], [41, 30, 63, 40]])


# ------------------------------------------------------------------------------ WBF


def _spy_wbf(monkeypatch) -> list[dict]:
    import ensemble_boxes

    calls: list[dict] = []
    real = ensemble_boxes.weighted_boxes_fusion

    def spy(boxes_list, scores_list, labels_list, **kwargs):
        calls.append({"boxes": [np.array(b) for b in boxes_list], "labels": labels_list, **kwargs})
        return real(boxes_list, scores_list, labels_list, **kwargs)

    monkeypatch.setattr(ensemble_boxes, "weighted_boxes_fusion", spy)
    return calls


def test_wbf_gets_normalised_boxes_and_the_predictor_returns_pixels(monkeypatch):
    calls = _spy_wbf(monkeypatch)
    height, width = 520, 704
    image = _blobs(height, width, rects=((100, 150, 300, 380), (400, 470, 600, 700)))
    a = Branch("a", BlobDetector(hi=0.9), weight=2.0)
    b = Branch("b", BlobDetector(hi=0.7, pad=2), weight=3.0)
    # the 8-entry reading: one WBF call (per_model, the default, is tested in test_predict_fusion)
    options = {"device": "cpu", "tta": True, "tta_fusion": "views"}
    predictor = Predictor([a, b], ContentSegmenter(), options)
    raw = predictor.detect_raw([_tensor(image)])[0]
    fused = predictor.fuse(raw, (height, width))

    (call,) = calls
    # each (branch, view) is one WBF model with its branch's weight; boxes in [0, 1]
    assert call["weights"] == [2.0, 2.0, 3.0, 3.0]
    assert call["iou_thr"] == 0.6 and call["skip_box_thr"] == 0.01 and call["conf_type"] == "avg"
    for boxes in call["boxes"]:
        assert boxes.min() >= 0 and boxes.max() <= 1
    np.testing.assert_allclose(
        call["boxes"][0][0], np.array([300, 100, 380, 150]) / [width, height, width, height]
    )
    # back in pixels: the weighted mean of 0/2-pixel-padded boxes, weights 2x0.9 and 3x0.7
    assert fused.boxes.max() > 1.5 and len(fused) == 2
    w_a, w_b = 2 * 0.9, 3 * 0.7
    expected_x0 = (w_a * 300 + w_b * 298) / (w_a + w_b)
    first = fused.boxes[np.argmin(fused.boxes[:, 0])]
    assert first[0] == pytest.approx(expected_x0, abs=1e-3)
    # the whole pipeline returns masks in pixels of the image
    inst = predictor.finish(_tensor(image), fused, {"score_thresholds": 0.0, "min_area": 0})
    assert inst.dense().shape == (2, height, width)


def test_one_entry_is_not_fused(monkeypatch):
    calls = _spy_wbf(monkeypatch)
    det = Detections([[0.5, 0.5, 10.25, 20.0], [1, 1, 9, 19]], [0.9, 0.3], [1, 1])
    out = fuse_detections([det], [2.0], (32, 32))
    assert out is det and not calls
    assert len(fuse_detections([Detections.empty(), Detections.empty()], [1, 1], (8, 8))) == 0


def test_fusion_keeps_labels_apart():
    a = Detections([[10, 10, 30, 30]], [0.9], [1])
    b = Detections([[10, 10, 30, 30]], [0.8], [2])
    out = fuse_detections([a, b], [1, 1], (64, 64))
    assert sorted(out.labels.tolist()) == [1, 2]


# ------------------------------------------------------------------------------ options


def test_predict_config_defaults_are_the_paper_and_match_configs_predict_yaml():
    assert load_predict_config(CONFIGS / "predict.yaml") == PREDICT_DEFAULTS
    opts = predict_config(None)
    assert opts["score_thresholds"] == {"shsy5y": 0.25, "cort": 0.55, "astro": 0.35}
    assert opts["wbf"] == {"iou_thr": 0.6, "skip_box_thr": 0.01, "conf_type": "avg"} and opts["tta"] is True
    # nested sections merge key by key; typos are errors naming the key
    assert predict_config({"wbf": {"iou_thr": 0.5}})["wbf"]["skip_box_thr"] == 0.01
    assert predict_config({"predict": {"min_area": 0}})["min_area"] == 0
    for bad, match in (
        ({"score_treshold": 0.3}, "score_treshold"),
        ({"wbf": {"iou": 0.5}}, "iou"),
        ({"min_area": {"neuron": 3}}, "neuron"),
        ({"wbf": {"conf_type": "mean"}}, "conf_type"),
    ):
        with pytest.raises(ValueError, match=match):
            predict_config(bad)
    opts = load_predict_config(None, ["predict.score_thresholds.cort=0.6", "predict.tta=false"])
    assert opts["score_thresholds"] == {"shsy5y": 0.25, "cort": 0.6, "astro": 0.35} and opts["tta"] is False
    with pytest.raises(ValueError, match="predict"):
        load_predict_config(None, ["train.lr=3"])


def test_image_class_majority_vote():
    # two confident cort, one confident astro, many weak shsy5y: the confident ones vote
    labels = [2, 2, 3, 1, 1, 1, 1, 1]
    scores = [0.9, 0.8, 0.95, 0.1, 0.2, 0.1, 0.1, 0.1]
    assert image_class(labels, scores) == 2
    assert image_class(labels, scores, min_score=0.0) == 2  # the weak shsy5y sum to 0.6 < 1.7
    assert image_class([1] * 5 + [2], [0.4] * 5 + [0.9], min_score=0.0) == 1  # 2.0 > 0.9
    assert image_class([1, 1, 3], [0.2, 0.2, 0.3], min_score=0.99) == 1  # nobody reaches it: all vote
    assert image_class([3, 2, 2], [0.95, 0.3, 0.3]) == 3  # the summed score decides, not the count
    assert image_class([3, 1, 1], [0.8, 0.4, 0.4]) == 1  # equal sums: more votes win
    assert image_class([3, 1], [0.7, 0.7]) == 1  # full tie: the lower label
    assert image_class(torch.tensor([3]), torch.tensor([0.1])) == 3
    assert image_class([], []) is None
    with pytest.raises(ValueError, match="shape"):
        image_class([1, 2], [0.5])


# ------------------------------------------------------------------------------ finishing


def _fixed_predictor(options) -> Predictor:
    return Predictor([Branch("a", BlobDetector())], ContentSegmenter(), {"device": "cpu", **options})


def test_class_vote_or_own_classes_and_thresholds():
    boxes = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [0, 20, 10, 30]]
    dets = Detections(boxes, [0.9, 0.8, 0.5, 0.3], [2, 2, 3, 1])
    image = _tensor(np.full((32, 64), 200, np.uint8))
    voted = _fixed_predictor({}).finish(image, dets, {"min_area": 0})
    # vote: cort; the astro box becomes cort and its 0.5 < cort's 0.55: dropped; so is the 0.3
    assert voted.labels.tolist() == [2, 2] and voted.scores.tolist() == pytest.approx([0.9, 0.8])
    own = _fixed_predictor({}).finish(image, dets, {"min_area": 0, "class_vote": False})
    # paper-exact: astro 0.5 >= 0.35 kept as astro, shsy5y 0.3 >= 0.25 kept as shsy5y
    assert own.labels.tolist() == [2, 2, 3, 1]
    no_masks = _fixed_predictor({}).finish(image, dets, {"score_thresholds": 0.95})
    assert len(no_masks) == 0 and no_masks.dense().shape == (0, 32, 64)


def test_rescoring_multiplies_by_the_mask_confidence_and_reorders():
    # two overlapping boxes; the higher-scoring one covers mostly background (low mask
    # probability), so re-scoring lets the other keep the contested pixels
    image = np.zeros((40, 40), np.uint8)
    image[10:30, 10:30] = 230
    dets = Detections([[0, 0, 24, 24], [10, 10, 30, 30]], [0.9, 0.8], [1, 1])
    seg = ContentSegmenter(inside=0.95, outside=0.52)
    pred = Predictor([Branch("a", BlobDetector())], seg, {"device": "cpu", "min_area": 0})
    plain = pred.finish(_tensor(image), dets)
    rescored = pred.finish(_tensor(image), dets, {"rescore": True, "min_area": 0})
    assert plain.scores.tolist() == pytest.approx([0.9, 0.8])
    assert rescored.boxes[0].tolist() == [10, 10, 30, 30]  # now first
    conf_big = rescored.scores[0] / 0.8
    assert 0.9 < conf_big <= 0.95 and rescored.scores[1] < 0.9 * 0.7
    areas = dict(zip(map(tuple, rescored.boxes.tolist()), rescored.areas().tolist(), strict=True))
    assert areas[(10.0, 10.0, 30.0, 30.0)] == 400  # it kept all of its pixels


# ------------------------------------------------------------------------------ cache


def test_detection_cache_round_trip_and_staleness(tmp_path):
    cache = DetectionCache(tmp_path)
    img = tmp_path / "x.png"
    img.write_bytes(b"abc")
    key = ImageKey.of("x", img)
    dets = [Detections([[1, 2, 3, 4]], [0.5], [2]), Detections([[0, 0, 1, 1]], [0.1], [1])]
    cache.save("b-1", key, ("identity", "hflip"), dets)
    back = cache.load("b-1", key, ("identity", "hflip"))
    assert (
        back is not None and np.array_equal(back[1].boxes, dets[1].boxes) and back[0].labels.tolist() == [2]
    )
    assert cache.load("b-1", key, ("identity",))[0].scores.tolist() == [0.5]  # a TTA entry serves no-TTA
    assert cache.load("b-2", key, ("identity",)) is None  # another checkpoint
    img.write_bytes(b"abcd")  # the image changed
    assert cache.load("b-1", ImageKey.of("x", img), ("identity",)) is None
    assert DetectionCache(None).load("b-1", key, ("identity",)) is None


def test_class_vote_before_wbf_merges_a_cell_two_branches_label_differently():
    """One cell, branch a says cort (2), branch b astro (3): after WBF (the default) WBF keeps one
    box per label and the vote relabels both, a duplicate; voting first merges them into one."""
    predictor = Predictor(
        [Branch("a", BlobDetector(), weight=2.0), Branch("b", BlobDetector(), weight=1.0)],
        ContentSegmenter(),
        {"device": "cpu", "tta": False},
    )
    raw = {
        "a": [Detections(np.array([[10.0, 10.0, 30.0, 30.0], [50, 50, 70, 70]]), [0.9, 0.8], [2, 2])],
        "b": [Detections(np.array([[11.0, 10.0, 31.0, 30.0]]), [0.6], [3])],
    }
    after = predictor.fuse(raw, (100, 100))
    assert sorted(after.labels.tolist()) == [2, 2, 3]  # the cell twice, once per label

    opts = predict_config({**predictor.options, "vote_before_wbf": True})
    before = predictor.fuse(raw, (100, 100), options=opts)
    assert before.labels.tolist() == [2, 2] and len(before) == 2  # the cell once, relabelled cort
    merged = before.boxes[np.argmin(before.boxes[:, 0])]
    assert 10.0 < merged[0] < 11.0  # both branches' boxes averaged
    # without the class vote the option does nothing
    no_vote = predictor.fuse(raw, (100, 100), options={**opts, "class_vote": False})
    assert sorted(no_vote.labels.tolist()) == [2, 2, 3]


def test_vote_entries_relabels_every_entry_and_keeps_empty_ones():
    from cellmask.predict.pipeline import vote_entries

    entries = [
        Detections(np.array([[0.0, 0, 5, 5]]), [0.9], [1]),
        Detections.empty(),
        Detections(np.array([[0.0, 0, 5, 5], [1, 1, 4, 4]]), [0.3, 0.3], [3, 3]),
    ]
    voted = vote_entries(entries, 0.25)
    assert [v.labels.tolist() for v in voted] == [[1], [], [1, 1]]  # 0.9 beats 0.3 + 0.3
    assert voted[2].scores.tolist() == pytest.approx([0.3, 0.3])
    assert vote_entries([Detections.empty()], 0.25)[0].labels.size == 0


# ------------------------------------------------------------------------------ mask write-back


def test_mask_write_back_copies_each_image_once(real_records):
    """``segmenter_masks`` (with and without a ProbabilityStore) and ``own_masks`` hand the
    pasted windows over as NumPy arrays equal to a window-by-window copy of the paste, with the
    same few host reads for 60 boxes as for 496 (never one per box)."""
    from functools import partial

    from _host_syncs import HostSyncs

    from cellmask.data.images import read_image
    from cellmask.models.segmenter import paste_masks
    from cellmask.predict.pipeline import ProbabilityStore, own_masks, segmenter_masks

    record = max(real_records, key=len)
    image = _tensor(read_image(record.path))
    seg = ContentSegmenter(crop_size=28)
    counts: dict[str, list[int]] = {"segmenter": [], "store": [], "own": []}
    for k in (60, len(record)):
        boxes = record.boxes[:k]
        keep = np.arange(0, k, 2)
        sel = torch.as_tensor(boxes[keep])
        rois = torch.cat([torch.zeros((len(sel), 1)), sel], 1)
        pasted, conf = paste_masks(
            seg.predict_probs(image[None], rois), sel, image.shape[-2:], 0.5, dense=False
        )
        expected = (pasted.offsets.numpy(), [w.numpy() for w in pasted.windows], conf.numpy())
        store = ProbabilityStore()
        makers = {
            "segmenter": partial(segmenter_masks, seg, image, boxes),
            "store": partial(segmenter_masks, seg, image, boxes, store=store),
            "own": partial(own_masks, pasted, image.shape[-2:]),
        }
        for name, make in makers.items():
            with HostSyncs() as syncs:
                offsets, windows, confidences = make()(keep if name != "own" else np.arange(len(keep)))
            counts[name].append(syncs.total)
            assert offsets.dtype == np.int64 and np.array_equal(offsets, expected[0])
            assert len(windows) == len(expected[1]) == len(keep)
            for got, want in zip(windows, expected[1], strict=True):
                assert got.dtype == bool and got.shape == want.shape and np.array_equal(got, want)
            if name != "own":
                np.testing.assert_array_equal(confidences, expected[2])
        assert len(store) == len(keep)
    for name, (few, many) in counts.items():
        assert few == many <= 12, (name, counts)
