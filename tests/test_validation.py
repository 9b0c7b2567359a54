"""Validation's COCO box AP (faster-coco-eval) equals pycocotools' ``COCOeval`` configured to the
same definition (maxDets (100, 300, 1000), area range ``all``, AP read at the largest maxDets),
on the real fixture images and on a dense synthetic image; the pycocotools fallback; LIVECell's
seeded validation subset."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from cellmask.training import validation
from cellmask.training.split import load_split, validation_subset
from cellmask.training.validation import DEFAULT_MAX_DETS, coco_box_ap

needs_faster_coco_eval = pytest.mark.skipif(
    importlib.util.find_spec("faster_coco_eval") is None, reason="faster-coco-eval is not installed"
)

# ------------------------------------------------------------------------------- the reference


def pycocotools_ap(predictions, targets, categories) -> dict[str, float]:
    """AP / AP50 / AP75 by pycocotools' COCOeval, set up here from scratch: xywh boxes,
    maxDets (100, 300, 1000), the area range ``all`` only, precision at the largest maxDets."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, gts, dts = [], [], []
    for image_id, (pred, target) in enumerate(zip(predictions, targets, strict=True), start=1):
        images.append({"id": image_id, "height": 1000, "width": 1000})
        for sink, boxes, labels, scores in (
            (gts, target["boxes"], target["labels"], None),
            (dts, pred["boxes"], pred["labels"], pred["scores"]),
        ):
            for k, ((x0, y0, x1, y1), label) in enumerate(zip(boxes.tolist(), labels.tolist(), strict=True)):
                ann = {"id": len(sink) + 1, "image_id": image_id, "category_id": int(label), "iscrowd": 0}
                ann.update(bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0))
                if scores is not None:
                    ann["score"] = float(scores[k])
                sink.append(ann)
    cats = [{"id": c, "name": str(c)} for c in categories]
    with contextlib.redirect_stdout(io.StringIO()):
        gt, dt = COCO(), COCO()
        gt.dataset = {"images": images, "annotations": gts, "categories": cats}
        dt.dataset = {"images": images, "annotations": dts, "categories": cats}
        gt.createIndex()
        dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.maxDets = list(DEFAULT_MAX_DETS)
        ev.params.areaRng, ev.params.areaRngLbl = [[0.0, 1e5**2]], ["all"]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K] at area all, 1000 detections
    thresholds = list(np.round(ev.params.iouThrs, 2))

    def mean(values: np.ndarray) -> float:
        return float(values[values > -1].mean())

    return {
        "AP": mean(precision),
        "AP50": mean(precision[thresholds.index(0.5)]),
        "AP75": mean(precision[thresholds.index(0.75)]),
    }


def detections(boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator, n_classes: int) -> dict:
    """Detections of one image: the truth less ~10% misses, jittered by ~8% of each box's side,
    5% with a wrong class, plus ~20% false positives; scores fall with the jitter (plus noise),
    rounded to 0.01 so that many tie, within and across images."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    kept = rng.random(len(boxes)) > 0.1
    found, found_labels = boxes[kept], np.asarray(labels)[kept].copy()
    side = (found[:, 2:] - found[:, :2]).repeat(2, axis=0).reshape(-1, 4)
    noise = rng.normal(0.0, 0.08, found.shape)
    found = found + noise * side
    found[:, 2:] = np.maximum(found[:, 2:], found[:, :2] + 1.0)
    wrong = rng.random(len(found)) < 0.05
    found_labels[wrong] = rng.integers(1, n_classes + 1, int(wrong.sum()))
    n_fp = max(1, len(boxes) // 5)
    lo = boxes.min(axis=0)[:2] if len(boxes) else np.zeros(2)
    hi = boxes.max(axis=0)[2:] if len(boxes) else np.full(2, 100.0)
    corners = rng.uniform(lo, hi, (n_fp, 2))
    false = np.concatenate([corners, corners + rng.uniform(4.0, 40.0, (n_fp, 2))], axis=1)
    scores = np.concatenate(
        [1.0 - np.abs(noise).mean(axis=1) * 4 + rng.normal(0, 0.1, len(found)), rng.uniform(0.0, 0.8, n_fp)]
    )
    return {
        "boxes": np.concatenate([found, false]).astype(np.float32),
        "scores": np.clip(np.round(scores, 2), 0.01, 1.0).astype(np.float32),
        "labels": np.concatenate([found_labels, rng.integers(1, n_classes + 1, n_fp)]).astype(np.int64),
    }


def assert_same(ours: dict[str, float], reference: dict[str, float]) -> None:
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert abs(ours[key] - value) <= 1e-6, (key, ours[key], value)


# ------------------------------------------------------------------------- equal to pycocotools


@needs_faster_coco_eval
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_ap_equals_pycocotools_on_real_images(real_records, seed):
    rng = np.random.default_rng(seed)
    targets = [{"boxes": r.boxes.astype(np.float32), "labels": r.labels} for r in real_records]
    predictions = [detections(t["boxes"], t["labels"], rng, n_classes=3) for t in targets]
    ours = coco_box_ap(predictions, real_records, num_classes=4, backend="faster_coco_eval")
    reference = pycocotools_ap(predictions, targets, categories=[1, 2, 3])
    assert_same(ours, reference)
    assert 0.2 < ours["AP"] < 0.95  # neither trivial nor perfect: the matching is exercised


@needs_faster_coco_eval
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_ap_equals_pycocotools_on_a_dense_image(seed):
    """2000 cells of three classes in one 1000x1000 image, beyond the 1000-detection cap."""
    rng = np.random.default_rng(100 + seed)
    corners = rng.uniform(0.0, 980.0, (2000, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(6.0, 20.0, (2000, 2))], axis=1)
    truth = {"boxes": boxes.astype(np.float32), "labels": rng.integers(1, 4, 2000)}
    prediction = detections(truth["boxes"], truth["labels"], rng, n_classes=3)
    assert len(prediction["boxes"]) > DEFAULT_MAX_DETS[-1]
    ours = coco_box_ap([prediction], [truth], num_classes=4, backend="faster_coco_eval")
    assert_same(ours, pycocotools_ap([prediction], [truth], categories=[1, 2, 3]))
    assert ours["AP"] > 0.1


@needs_faster_coco_eval
def test_backends_agree_and_unknown_backend_is_refused(real_records):
    assert validation.default_backend() == "faster_coco_eval"
    rng = np.random.default_rng(7)
    predictions = [detections(r.boxes, r.labels, rng, n_classes=3) for r in real_records[:2]]
    fast = coco_box_ap(predictions, real_records[:2], num_classes=4, backend="faster_coco_eval")
    slow = coco_box_ap(predictions, real_records[:2], num_classes=4, backend="pycocotools")
    assert_same(fast, slow)
    with pytest.raises(ValueError, match="unknown COCOeval backend 'cocoapi'"):
        coco_box_ap(predictions, real_records[:2], backend="cocoapi")


@needs_faster_coco_eval
def test_without_faster_coco_eval_pycocotools_gives_the_same_figures(real_records, monkeypatch, caplog):
    rng = np.random.default_rng(3)
    predictions = [detections(r.boxes, r.labels, rng, n_classes=3) for r in real_records[:2]]
    expected = coco_box_ap(predictions, real_records[:2], num_classes=4)
    validation.default_backend.cache_clear()
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import raises ImportError
    try:
        with caplog.at_level(logging.WARNING, logger="cellmask.training.validation"):
            assert validation.default_backend() == "pycocotools"
            assert_same(coco_box_ap(predictions, real_records[:2], num_classes=4), expected)
        assert any("faster-coco-eval" in r.getMessage() for r in caplog.records)
    finally:
        validation.default_backend.cache_clear()
    with pytest.raises(ImportError):
        coco_box_ap(predictions, real_records[:2], num_classes=4, backend="faster_coco_eval")


def test_empty_cases_keep_their_conventions():
    truth = [{"boxes": np.array([[0, 0, 10, 10]], np.float32), "labels": np.array([1])}]
    none = [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}]
    assert coco_box_ap(none, truth, num_classes=2) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    no_truth = [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)}]
    assert math.isnan(coco_box_ap(none, no_truth)["AP"])


# ------------------------------------------------------------------- LIVECell validation subset


def fake_records(counts: dict[str, int]) -> list[SimpleNamespace]:
    records = [
        SimpleNamespace(image_id=f"{cell_type}_{i:03d}", cell_type=cell_type)
        for cell_type, n in counts.items()
        for i in range(n)
    ]
    return [records[i] for i in np.random.default_rng(0).permutation(len(records))]


COUNTS = {"a172": 70, "bt474": 60, "bv2": 110, "huh7": 40, "mcf7": 80, "shsy5y": 70, "skbr3": 90, "skov3": 50}


def test_validation_subset_is_seeded_stratified_and_keeps_order():
    records = fake_records(COUNTS)
    subset = validation_subset(records, 200, seed=0)
    assert len(subset) == 200 and len({r.image_id for r in subset}) == 200
    positions = [records.index(r) for r in subset]
    assert positions == sorted(positions)  # the records' own order
    shares = Counter(r.cell_type for r in subset)
    for cell_type, n in COUNTS.items():
        assert abs(shares[cell_type] - 200 * n / len(records)) <= 1, (cell_type, shares[cell_type])

    ids = [r.image_id for r in subset]
    assert [r.image_id for r in validation_subset(records, 200, seed=0)] == ids  # every epoch
    reordered = list(reversed(records))  # another listing of the same split: the same images
    assert sorted(r.image_id for r in validation_subset(reordered, 200, seed=0)) == sorted(ids)
    assert [r.image_id for r in validation_subset(records, 200, seed=1)] != ids


@pytest.mark.parametrize("max_images", [None, 0, 570, 1000])
def test_validation_subset_all_images(max_images):
    records = fake_records(COUNTS)
    assert validation_subset(records, max_images, seed=0) == records


def test_validation_subset_refuses_a_negative_size():
    with pytest.raises(ValueError, match="val.max_images"):
        validation_subset(fake_records(COUNTS), -5, seed=0)


def test_livecell_split_validates_on_the_configured_subset(monkeypatch, caplog, tmp_path):
    import cellmask.data.livecell as livecell

    val = fake_records(COUNTS)
    train = fake_records({"a172": 3})
    monkeypatch.setattr(livecell, "read_livecell", lambda root, splits: val if splits == ("val",) else train)
    cfg = {"train": {"seed": 4}, "val": {"max_images": 100}}
    with caplog.at_level(logging.INFO, logger="cellmask.training.command"):
        got_train, got_val, _ = load_split(cfg, tmp_path, "livecell")
    assert got_train == train
    assert [r.image_id for r in got_val] == [r.image_id for r in validation_subset(val, 100, seed=4)]
    assert any(
        "100 of 570" in r.getMessage() and "val.max_images=100" in r.getMessage() for r in caplog.records
    )

    cfg["val"]["max_images"] = None
    assert load_split(cfg, tmp_path, "livecell")[1] == val
