"""The competition metric: hand-computed cases, real data, a dense reference, the CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellmask.cli import main
from cellmask.data.rle import rle_decode, rle_encode, rle_to_coco
from cellmask.errors import DataError
from cellmask.metric import (
    THRESHOLDS,
    RLEError,
    ScoreReport,
    TruthImage,
    image_precision,
    iou_matrix,
    read_truth_csv,
    rles_to_runs,
    score_files,
    score_submission,
)

H, W = 40, 50


def rect(y0: int, x0: int, h: int, w: int, height: int = H, width: int = W) -> str:
    """RLE of an axis-aligned rectangle."""
    m = np.zeros((height, width), dtype=bool)
    m[y0 : y0 + h, x0 : x0 + w] = True
    return rle_encode(m)


def one_image(truth: list[str], pred: list[str] | None, cell_type: str = "cort") -> ScoreReport:
    preds = {} if pred is None else {"a": pred}
    return score_submission({"a": TruthImage(H, W, cell_type, truth)}, preds)


# ----------------------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------------------


def test_thresholds_are_exact():
    assert len(THRESHOLDS) == 10
    assert THRESHOLDS.tolist() == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def test_empty_cases():
    a = rect(2, 2, 10, 10)
    assert one_image([], []).score == 1.0  # nothing to find, nothing predicted
    assert one_image([], None).score == 1.0  # absent from the submission: same thing
    assert one_image([], [a]).score == 0.0  # FP only
    assert one_image([a], []).score == 0.0  # FN only
    assert one_image([a], None).score == 0.0
    np.testing.assert_array_equal(image_precision(np.zeros((0, 0))), np.ones(10))
    np.testing.assert_array_equal(image_precision(np.zeros((0, 3))), np.zeros(10))
    np.testing.assert_array_equal(image_precision(np.zeros((2, 0))), np.zeros(10))
    assert iou_matrix([], [a], H, W).shape == (0, 1)
    assert iou_matrix([a, a], [], H, W).shape == (2, 0)
    # Empty strings are "no instance", as an empty `predicted` cell is.
    assert iou_matrix(["", a, "  "], [a], H, W).shape == (1, 1)


def test_perfect_and_partial():
    a, b, c = rect(0, 0, 10, 10), rect(20, 20, 10, 10), rect(0, 30, 5, 5)
    assert one_image([a, b, c], [c, a, b]).score == 1.0
    # one of three found: TP 1, FN 2 -> 1/3 at every threshold
    assert one_image([a, b, c], [a]).score == pytest.approx(1 / 3)
    # all found + one false positive: 3 / (3 + 1)
    assert one_image([a, b], [a, b, c]).score == pytest.approx(2 / 3)


def test_duplicated_prediction():
    a, b = rect(0, 0, 10, 10), rect(20, 20, 10, 10)
    # Truth a matched by two predictions: not TP, not FN; both predictions match a, so no FP.
    # b is the only TP: 1 / (1 + 0 + 0) = 1.
    assert one_image([a, b], [a, a, b]).score == 1.0
    # Truth b missed: TP 0, FP 0, FN 1 -> 0.
    assert one_image([a, b], [a, a]).score == 0.0
    # Nothing counted at all (TP = FP = FN = 0) with instances present: 0 by convention.
    assert one_image([a], [a, a]).score == 0.0
    # Duplicated truth: the prediction matches two truths, each has exactly one match: TP 2.
    assert one_image([a, a], [a]).score == 1.0


@pytest.mark.parametrize(
    ("inside", "n_matching"),
    [(50, 0), (51, 1), (55, 1), (56, 2), (60, 2), (90, 8), (95, 9), (96, 10), (100, 10)],
)
def test_threshold_edges_are_strict(inside: int, n_matching: int):
    """A prediction of ``inside`` pixels inside a 100-pixel truth has IoU inside/100 exactly."""
    truth = rect(5, 5, 10, 10)
    m = rle_decode(truth, H, W).ravel()
    keep = np.flatnonzero(m)[:inside]
    pred = np.zeros(H * W, dtype=bool)
    pred[keep] = True
    iou = iou_matrix([truth], [rle_encode(pred.reshape(H, W))], H, W)
    assert iou[0, 0] == inside / 100
    expected = np.array([1.0] * n_matching + [0.0] * (10 - n_matching))
    np.testing.assert_array_equal(image_precision(iou), expected)
    assert one_image([truth], [rle_encode(pred.reshape(H, W))]).score == pytest.approx(n_matching / 10)


def test_image_precision_counts_by_hand():
    # 3 truths x 3 predictions; truth 0 matched once (0.72), truth 1 matched twice at low
    # thresholds (0.62 and 0.58), truth 2 unmatched; prediction 2 matches nothing.
    iou = np.array([[0.72, 0.0, 0.0], [0.0, 0.62, 0.0], [0.0, 0.0, 0.1]])
    iou = np.concatenate([iou, [[0.0], [0.58], [0.0]]], axis=1)  # prediction 3 duplicates 1
    got = image_precision(iou)
    # t=0.50,0.55: truth1 has 2 matches -> TP 1 (truth 0), FN 1 (truth 2), FP 1 (pred 2) -> 1/3
    # t=0.60: pred 3 stops matching: TP 2, FN 1, FP 2 -> 2/5
    # t=0.65,0.70: TP 1, FN 2, FP 3 -> 1/6; t>=0.75: TP 0, FN 3, FP 4 -> 0
    expected = [1 / 3, 1 / 3, 2 / 5, 1 / 6, 1 / 6, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(got, expected)


def test_overlapping_predictions_exact():
    a, b = rect(0, 0, 10, 10), rect(5, 5, 10, 10)  # 25 px overlap
    iou = iou_matrix([a, b], [b, a, a], H, W)
    np.testing.assert_allclose(iou, [[25 / 175, 1, 1], [1, 25 / 175, 25 / 175]])


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


def test_fast_and_slow_parse_agree():
    a, b = rect(0, 0, 10, 10), rect(20, 20, 3, 7)
    fast = rles_to_runs([a, b], H, W)
    slow = rles_to_runs([a.replace(" ", "  "), "\t" + b + " "], H, W)  # non-canonical text
    for x, y in zip(fast[:3], slow[:3], strict=True):
        np.testing.assert_array_equal(x, y)
    assert fast[3] == slow[3] == 2


@pytest.mark.parametrize("bad", ["1 2 3", "0 5", "5 0", "1 x", "1 5 3 2", "1 2001", "1.5 2", "-1 3"])
def test_malformed_rle_names_its_index(bad: str):
    with pytest.raises(RLEError) as info:
        rles_to_runs([rect(0, 0, 2, 2), "", bad], H, W)
    assert info.value.index == 2
    with pytest.raises(DataError, match=r"image id 'a', prediction 2 \(row 3 of that id\)"):
        one_image([], [rect(0, 0, 2, 2), rect(5, 5, 2, 2), bad])


# ----------------------------------------------------------------------------------------------
# Real data: self-score, a dense reference, pycocotools
# ----------------------------------------------------------------------------------------------

REAL_CSV = Path(__file__).parent / "fixtures" / "sartorius_real" / "train.csv"


@pytest.fixture(scope="module")
def real_truth() -> dict[str, TruthImage]:
    return read_truth_csv(REAL_CSV)


def _shift(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(m)
    h, w = m.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = m[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _dilate(m: np.ndarray) -> np.ndarray:
    return m | _shift(m, 1, 0) | _shift(m, -1, 0) | _shift(m, 0, 1) | _shift(m, 0, -1)


def _erode(m: np.ndarray) -> np.ndarray:
    return m & _shift(m, 1, 0) & _shift(m, -1, 0) & _shift(m, 0, 1) & _shift(m, 0, -1)


def perturb(rles: list[str], h: int, w: int, rng: np.random.Generator) -> list[str]:
    """Drop, shift, dilate, erode and duplicate instances, and add false positives.

    Works on a padded crop around each mask, so it is fast; predictions may overlap.
    """
    out = []
    for rle in rles:
        action = rng.integers(7)
        if action == 0:
            continue  # dropped: a false negative
        m = rle_decode(rle, h, w)
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = max(ys.min() - 4, 0), ys.max() + 5, max(xs.min() - 4, 0), xs.max() + 5
        crop = m[y0:y1, x0:x1]
        if action == 1:
            crop = _shift(crop, int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
        elif action == 2:
            crop = _dilate(crop)
        elif action == 3:
            crop = _erode(crop)
        new = np.zeros_like(m)
        new[y0:y1, x0:x1] = crop
        if new.any():
            out.append(rle_encode(new))
        if action == 4:
            out.append(out[-1])  # a duplicated prediction
    for _ in range(max(len(rles) // 10, 1)):  # false positives, some overlapping cells
        cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), rng.integers(3, 9)
        yy, xx = np.ogrid[:h, :w]
        out.append(rle_encode((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r))
    rng.shuffle(out)
    return out


@pytest.fixture(scope="module")
def real_pred(real_truth) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    return {k: perturb(v.rles, v.height, v.width, rng) for k, v in real_truth.items()}


def dense_iou(truth: list[str], pred: list[str], h: int, w: int) -> np.ndarray:
    """Reference IoU: every mask decoded to a dense H x W array, pairs compared pixel by pixel
    over the union of their boxes (pairs whose boxes do not touch have IoU 0)."""

    def decode(rles):
        masks = [rle_decode(r, h, w) for r in rles]
        boxes = []
        for m in masks:
            rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            boxes.append((rows[0], rows[-1], cols[0], cols[-1]))
        return masks, np.array(boxes).reshape(-1, 4)

    tm, tb = decode(truth)
    pm, pb = decode(pred)
    iou = np.zeros((len(truth), len(pred)))
    touch = (
        (tb[:, None, 0] <= pb[None, :, 1])
        & (pb[None, :, 0] <= tb[:, None, 1])
        & (tb[:, None, 2] <= pb[None, :, 3])
        & (pb[None, :, 2] <= tb[:, None, 3])
    )
    for i, j in zip(*np.nonzero(touch), strict=True):
        y0, y1 = min(tb[i, 0], pb[j, 0]), max(tb[i, 1], pb[j, 1]) + 1
        x0, x1 = min(tb[i, 2], pb[j, 2]), max(tb[i, 3], pb[j, 3]) + 1
        a, b = tm[i][y0:y1, x0:x1], pm[j][y0:y1, x0:x1]
        iou[i, j] = (a & b).sum() / (a | b).sum()
    return iou


def reference_image_score(iou: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The spec, literally: loops over thresholds, truths and predictions."""
    n_t, n_p = iou.shape
    precisions, counts = [], []
    for t in (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
        if n_t == 0 and n_p == 0:
            precisions.append(1.0)
            counts.append((0, 0, 0))
            continue
        matches = [[iou[i, j] > t for j in range(n_p)] for i in range(n_t)]
        tp = sum(1 for i in range(n_t) if sum(matches[i]) == 1)
        fn = sum(1 for i in range(n_t) if sum(matches[i]) == 0)
        fp = sum(1 for j in range(n_p) if not any(matches[i][j] for i in range(n_t)))
        precisions.append(tp / (tp + fp + fn) if tp + fp + fn else 0.0)
        counts.append((tp, fp, fn))
    return np.array(precisions), counts


def test_real_truth_scored_against_itself(real_truth):
    report = score_submission(real_truth, {k: v.rles for k, v in real_truth.items()})
    assert report.n_images == 6
    assert report.per_image == {k: 1.0 for k in real_truth}
    assert report.score == 1.0
    assert report.per_class == {"shsy5y": 1.0, "cort": 1.0, "astro": 1.0}
    assert report.class_counts == {"shsy5y": 2, "cort": 2, "astro": 2}


def test_real_duplicated_truth_by_the_spec(real_truth):
    """de504eaa5349 has truths 365 and 399 identical, and truth 16 overlapping both with IoU
    0.774. Self-scored, each of those truths matches several predictions: neither TP nor FN,
    and no prediction is FP, so precision is TP / TP = 1 at every threshold all the same, with
    493 TPs for 496 truths below t = 0.774 and 494 above (the identical pair always matches
    twice). The metric cannot tell a duplicated truth from a perfect prediction of it."""
    img = real_truth["de504eaa5349"]
    rles = img.rles
    assert len(rles) == 496 and len(set(rles)) == 495 and rles[365] == rles[399]
    iou = dense_iou(rles, rles, img.height, img.width)
    assert iou[16, 365] == pytest.approx(0.7738, abs=1e-4)
    prec, counts = reference_image_score(iou)
    np.testing.assert_array_equal(prec, np.ones(10))
    assert counts == [(493, 0, 0)] * 6 + [(494, 0, 0)] * 4  # t <= 0.75, then t >= 0.80
    np.testing.assert_array_equal(image_precision(iou_matrix(rles, rles, img.height, img.width)), prec)


def test_iou_matches_pycocotools(real_truth, real_pred):
    from pycocotools import mask as mask_utils

    for image_id, img in list(real_truth.items())[:3]:
        pred = real_pred[image_id]
        ours = iou_matrix(img.rles, pred, img.height, img.width)
        h, w = img.height, img.width
        gt = mask_utils.frPyObjects([rle_to_coco(r, h, w) for r in img.rles], w, h)
        dt = mask_utils.frPyObjects([rle_to_coco(r, h, w) for r in pred], w, h)
        # pycocotools.iou(dt, gt, iscrowd) is [len(dt), len(gt)]
        theirs = mask_utils.iou(dt, gt, [0] * len(gt)).T
        np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_agrees_with_dense_reference(real_truth, real_pred):
    report = score_submission(real_truth, real_pred)
    ref_rows = {}
    for image_id, img in real_truth.items():
        iou_ref = dense_iou(img.rles, real_pred[image_id], img.height, img.width)
        ours = iou_matrix(img.rles, real_pred[image_id], img.height, img.width)
        np.testing.assert_allclose(ours, iou_ref, atol=1e-12)
        ref_rows[image_id] = reference_image_score(iou_ref)[0]
    ref_scores = {k: v.mean() for k, v in ref_rows.items()}
    for k in real_truth:
        assert report.per_image[k] == pytest.approx(ref_scores[k], abs=1e-6)
    assert 0.2 < report.score < 0.95  # a real, imperfect score
    assert report.score == pytest.approx(np.mean(list(ref_scores.values())), abs=1e-6)
    for cls in ("shsy5y", "cort", "astro"):
        ids = [k for k, v in real_truth.items() if v.cell_type == cls]
        assert report.per_class[cls] == pytest.approx(np.mean([ref_scores[k] for k in ids]), abs=1e-6)
    ref_thr = np.mean(list(ref_rows.values()), axis=0)
    np.testing.assert_allclose(list(report.per_threshold.values()), ref_thr, atol=1e-6)
    assert list(report.per_threshold) == [f"{t:.2f}" for t in THRESHOLDS]


def test_accepts_image_records(real_truth):
    from cellmask.data.records import ImageRecord

    records = [
        ImageRecord(k, Path(k), v.height, v.width, v.cell_type, segmentations=v.rles, seg_format="rle")
        for k, v in real_truth.items()
    ]
    report = score_submission(records, {"0140b3c8f445": real_truth["0140b3c8f445"].rles})
    assert report.per_image["0140b3c8f445"] == 1.0
    assert report.per_image["0030fd0e6378"] == 0.0  # missing from the predictions
    assert report.per_class["astro"] == 0.5


def test_accepts_records_from_read_train_csv(real_records, real_truth, real_pred):
    """The truth as the data layer reads it (ImageRecord) scores like read_truth_csv's."""
    from_records = score_submission(real_records, real_pred)
    expected = score_submission(real_truth, real_pred)
    assert from_records.per_image == expected.per_image
    assert from_records.per_class == expected.per_class


def test_per_class_nan_without_images():
    report = one_image([rect(0, 0, 5, 5)], [rect(0, 0, 5, 5)], cell_type="astro")
    assert report.per_class["astro"] == 1.0
    assert np.isnan(report.per_class["cort"]) and np.isnan(report.per_class["shsy5y"])
    assert report.to_dict()["per_class"] == {"shsy5y": None, "cort": None, "astro": 1.0}


# ----------------------------------------------------------------------------------------------
# Files and CLI
# ----------------------------------------------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_submission(path: Path, pred: dict[str, list[str]]) -> Path:
    rows = []
    for image_id, rles in pred.items():
        rows += [[image_id, r] for r in rles] or [[image_id, ""]]
    return write_csv(path, ["id", "predicted"], rows)


def test_cli_json_on_files(tmp_path, capsys, real_truth, real_pred):
    sub = write_submission(tmp_path / "submission.csv", real_pred)
    assert main(["score", "--truth", str(REAL_CSV), "--pred", str(sub), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = score_submission(real_truth, real_pred)
    assert set(out) >= {"score", "per_class", "per_threshold", "n_images"}
    assert out["score"] == pytest.approx(expected.score, abs=1e-12)
    assert out["n_images"] == 6
    assert set(out["per_class"]) == {"shsy5y", "cort", "astro"}
    assert list(out["per_threshold"]) == [
        "0.50",
        "0.55",
        "0.60",
        "0.65",
        "0.70",
        "0.75",
        "0.80",
        "0.85",
        "0.90",
        "0.95",
    ]
    # the table
    assert main(["score", "--truth", str(REAL_CSV), "--pred", str(sub)]) == 0
    table = capsys.readouterr().out
    assert f"{expected.score:.4f}" in table and "astro" in table and "0.95" in table


def test_truth_csv_empty_annotation_and_missing_image(tmp_path):
    a = rect(0, 0, 5, 5)
    truth = write_csv(
        tmp_path / "train.csv",
        ["id", "annotation", "width", "height", "cell_type"],
        [["x", a, W, H, "cort"], ["empty", "", W, H, "astro"], ["y", a, W, H, "shsy5y"]],
    )
    parsed = read_truth_csv(truth)
    assert parsed["empty"].rles == [] and parsed["x"].rles == [a]
    sub = write_submission(tmp_path / "sub.csv", {"x": [a], "empty": []})  # y missing
    report = score_files(truth, sub)
    assert report.per_image == {"x": 1.0, "empty": 1.0, "y": 0.0}


def test_truth_csv_errors(tmp_path):
    a = rect(0, 0, 5, 5)
    bad = write_csv(
        tmp_path / "t.csv", ["id", "annotation", "width", "height"], [["x", a, W, H], ["x", a, W, 41]]
    )
    with pytest.raises(DataError, match=r"t\.csv, line 3: id 'x': height/width/cell_type 41/50/None differ"):
        read_truth_csv(bad)
    bad = write_csv(tmp_path / "u.csv", ["id", "annotation", "width", "height"], [["x", a, "w", H]])
    with pytest.raises(DataError, match=r"u\.csv, line 2"):
        read_truth_csv(bad)
    with pytest.raises(DataError, match="missing column"):
        read_truth_csv(write_csv(tmp_path / "v.csv", ["id", "annotation"], [["x", a]]))


# ----------------------------------------------------------------------------------------------
# The bytes-level scanner (cellmask.metric.scan) against the general parser
# ----------------------------------------------------------------------------------------------


def _write_text(path: Path, header: str, rows: list[str], end: str = "\n") -> Path:
    path.write_bytes((end.join([header, *rows]) + end).encode())
    return path


def _outcome(truth_csv: Path, pred_csv: Path, scanner: bool) -> ScoreReport | str:
    """What ``score_files`` gives, a report or an error message, with the scanner on or off
    (off: the general parser alone, ``read_truth_csv`` + ``read_submission``)."""
    with pytest.MonkeyPatch.context() as m:
        if not scanner:
            m.setattr("cellmask.metric.files.score_plain_files", lambda *_: None)
        try:
            return score_files(truth_csv, pred_csv)
        except DataError as exc:
            return str(exc)


def _assert_scanner_matches_general(truth_csv: Path, pred_csv: Path) -> ScoreReport | str:
    """Same report (to the bit) or the same error message with and without the scanner."""
    fast, general = _outcome(truth_csv, pred_csv, True), _outcome(truth_csv, pred_csv, False)
    if isinstance(fast, str) or isinstance(general, str):
        assert fast == general
        return fast
    assert fast.to_dict() == general.to_dict() and fast.per_image == general.per_image
    np.testing.assert_array_equal(fast.precision, general.precision)
    return fast


def test_scanner_matches_general_parser_on_real_files(tmp_path, real_truth, real_pred):
    """The scanner reads the real data (plain, CRLF, rows shuffled, train.csv itself) and
    gives exactly the general parser's report."""
    from cellmask.metric.scan import score_plain_files

    truth_rows = [
        f"{k},{r},{v.width},{v.height},{v.cell_type}" for k, v in real_truth.items() for r in v.rles
    ]
    truth_rows.append(f"nothing,,{W},{H},cort")  # an image without truth instances
    pred = dict(real_pred)
    pred.pop("0a6ecc5fe78a")  # an image absent from the submission
    pred_rows = [f"{k},{r}" for k, rles in pred.items() for r in rles] + [f"nothing,{rect(0, 0, 3, 3)}"]
    header = "id,annotation,width,height,cell_type"
    rng = np.random.default_rng(1)
    cases = {
        "plain": (truth_rows, pred_rows, "\n"),
        "crlf": (truth_rows, pred_rows, "\r\n"),
        "shuffled": (list(rng.permutation(truth_rows)), list(rng.permutation(pred_rows)), "\n"),
    }
    for name, (t_rows, p_rows, end) in cases.items():
        truth_csv = _write_text(tmp_path / f"t_{name}.csv", header, t_rows, end)
        pred_csv = _write_text(tmp_path / f"p_{name}.csv", "id,predicted", p_rows, end)
        assert score_plain_files(truth_csv, pred_csv) is not None, name  # the scanner read it
        report = _assert_scanner_matches_general(truth_csv, pred_csv)
        assert report.per_image["nothing"] == 0.0  # a false positive on an empty image
    # Real train.csv (9 columns, spaces in elapsed_timedelta) scored against itself.
    self_csv = _write_text(
        tmp_path / "self.csv", "id,predicted", [f"{k},{r}" for k, v in real_truth.items() for r in v.rles]
    )
    assert score_plain_files(REAL_CSV, self_csv) is not None
    assert _assert_scanner_matches_general(REAL_CSV, self_csv).score == 1.0


_TRUTH = f"id,annotation,width,height,cell_type\na,1 3,{W},{H},cort\na,101 5,{W},{H},cort\nb,,{W},{H},astro\n"


_P = "id,predicted\n"
_A = _P + "a,1 3\n"  # not only a header: the scanner leaves such a file for that alone
_NO_CELL_TYPE = _TRUTH.replace(",cell_type", "").replace(",cort", "").replace(",astro", "")
_REORDERED = f"cell_type,height,width,annotation,id,x\ncort,{H},{W},1 3,a,q\nastro,{H},{W},,b,q\n"


@pytest.mark.parametrize(
    ("truth_text", "pred_text", "scanned"),
    [
        # plain files: the scanner reads them
        pytest.param(_TRUTH, "id,predicted\na,1 3\na,101 4\n", True, id="plain"),
        pytest.param(_TRUTH.replace("\n", "\r\n"), "id,predicted\r\na,1 3\r\na,101 5\r\n", True, id="crlf"),
        pytest.param(_TRUTH, "id,predicted\na,\nb,\n", True, id="empty-predicted"),
        pytest.param(_TRUTH, "id,predicted\na,\na,101 5\nb,3 2\n", True, id="empty-and-not"),
        pytest.param(_TRUTH, "id,predicted\na,1 3\nb,3 2\na,101 5\n", True, id="rows-of-an-id-apart"),
        pytest.param(_TRUTH, "id,predicted,score\na,1 3,0.9\nb,3 2,0.2\n", True, id="extra-column"),
        pytest.param(_TRUTH, "score,predicted,id\n0.9,1 3,a\n", True, id="columns-reordered"),
        pytest.param(_REORDERED, "id,predicted\na,1 3\n", True, id="truth-columns-reordered"),
        pytest.param(_TRUTH, "id,predicted\na,1 3", True, id="no-final-line-end"),
        pytest.param("\ufeff" + _TRUTH, "id,predicted\na,1 3\n", True, id="truth-byte-order-mark"),
        pytest.param(_TRUTH, "id,predicted\na,01 3\n", True, id="leading-zero"),
        pytest.param(_TRUTH.replace(f",{W},{H},", f",0{W},0{H},"), _A, True, id="size-leading-zero"),
        # anything unusual: the scanner declines, the general parser reads it
        pytest.param(_TRUTH, "id,predicted\n", False, id="only-a-header"),
        pytest.param(_TRUTH, 'id,predicted\n"a","1 3"\n', False, id="quoted"),
        pytest.param(_TRUTH.replace("a,1 3,", 'a,"1 3",'), "id,predicted\na,1 3\n", False, id="truth-quoted"),
        pytest.param(_TRUTH.replace("a,", '"a",'), 'id,predicted\n"a",1 3\n', False, id="ids-quoted"),
        pytest.param(_TRUTH, "id,predicted\na,1 3\n\nb,5 2\n", False, id="blank-line"),
        pytest.param(_TRUTH, "id,predicted\na,1  3\n", False, id="double-space"),
        pytest.param(_TRUTH, "id,predicted\na,1\t3\n", False, id="tab"),
        pytest.param(_TRUTH.replace("a,", " a ,"), "id,predicted\n a ,1 3\n", False, id="spaces-around-id"),
        pytest.param(_TRUTH, "id,predicted\na,+1 3\n", False, id="plus-sign"),
        pytest.param(_TRUTH, "id,predicted\na,1 3,x\n", False, id="field-beyond-header"),
        pytest.param(_NO_CELL_TYPE, "id,predicted\na,1 3\n", False, id="truth-without-cell-type"),
    ],
)
def test_scanner_matches_general_parser(tmp_path, truth_text: str, pred_text: str, scanned: bool):
    """Odd but valid files: the same report with and without the scanner, and the scanner
    takes exactly the plain ones (so this compares the two parsers, not one with itself)."""
    from cellmask.metric.scan import score_plain_files

    truth_csv, pred_csv = tmp_path / "t.csv", tmp_path / "p.csv"
    truth_csv.write_bytes(truth_text.encode())
    pred_csv.write_bytes(pred_text.encode())
    assert (score_plain_files(truth_csv, pred_csv) is not None) == scanned
    assert isinstance(_assert_scanner_matches_general(truth_csv, pred_csv), ScoreReport)


_MALFORMED = {  # name: (truth text, submission text, the error message the general parser gives)
    "unknown-id": (_TRUTH, _P + "a,1 3\nzz,5 2\n", r"p\.csv, line 3: image id 'zz' is not in"),
    "unsorted": (_TRUTH, _P + "a,1 3\na,5 3 1 2\n", r"p\.csv, line 3: .*'a', prediction 1 .*unsorted"),
    "start-0": (_TRUTH, _P + "a,0 3\n", r"p\.csv, line 2: .*'a', prediction 0 .*start 0"),
    "odd": (_TRUTH, _P + "b,\na,1 3 5\n", r"p\.csv, line 3: .*'a', prediction 0 .*odd"),
    "beyond": (_TRUTH, _P + "a,1999 3\n", r"p\.csv, line 2: .*beyond the image"),
    "overlap": (_TRUTH, _P + "a,1 5 3 2\n", r"p\.csv, line 2: .*overlapping runs"),
    "empty-id": (_TRUTH, _P + "a,1 3\n,5 2\n", r"p\.csv, line 3: empty id"),
    "no-column": (_TRUTH, "id,pred\na,1 3\n", r"p\.csv: missing column\(s\) predicted"),
    "truth-sizes-differ": (_TRUTH.replace(f"5,{W},{H}", f"5,{W},{H + 1}"), _A, r"t\.csv, line 3: id 'a'"),
    "truth-rle": (_TRUTH.replace("101 5", "101 5 7"), _A, r"t\.csv, line 3: .*'a', truth instance 1"),
    "truth-size-0": (_TRUTH.replace(f"b,,{W},{H}", f"b,,{W},0"), _A, r"t\.csv, line 4: id 'b'"),
    "truth-short-row": (_TRUTH + "c,1 3\n", _A, r"t\.csv, line 5: 2 field\(s\)"),
    "truth-empty-id": (_TRUTH + f",1 3,{W},{H},cort\n", _A, r"t\.csv, line 5: empty id"),
}


@pytest.mark.parametrize(("truth_text", "pred_text", "message"), _MALFORMED.values(), ids=_MALFORMED)
def test_scanner_leaves_malformed_files_to_the_general_parser(
    tmp_path, truth_text: str, pred_text: str, message: str
):
    """A malformed file never gets a score from the scanner: the general parser names the
    file, the line and the image id, exactly as without the scanner."""
    from cellmask.metric.scan import score_plain_files

    truth_csv, pred_csv = tmp_path / "t.csv", tmp_path / "p.csv"
    truth_csv.write_bytes(truth_text.encode())
    pred_csv.write_bytes(pred_text.encode())
    assert score_plain_files(truth_csv, pred_csv) is None
    with pytest.raises(DataError, match=message):
        score_files(truth_csv, pred_csv)
    assert isinstance(_assert_scanner_matches_general(truth_csv, pred_csv), str)


def test_run_and_pixel_intersections_agree(real_truth, real_pred):
    from cellmask.metric.iou import _intersections_by_pixels, _intersections_by_runs

    for image_id, img in real_truth.items():
        t = rles_to_runs(img.rles, img.height, img.width)
        p = rles_to_runs(real_pred[image_id], img.height, img.width)
        for a, b in ((t, p), (p, t)):  # both sides overlap somewhere
            by_runs = _intersections_by_runs(a, b)
            by_pixels = _intersections_by_pixels(a, b, img.height * img.width)
            for x, y in zip(by_runs, by_pixels, strict=True):  # (ti, pj, inter), sorted by pair
                np.testing.assert_array_equal(x, y)
    # A prediction covering the whole image makes every run a candidate: the pixel path runs.
    full = rle_encode(np.ones((H, W), dtype=bool))
    small = [rect(y, x, 3, 3) for y in range(0, 36, 4) for x in range(0, 48, 4)]
    t, p = rles_to_runs(small, H, W), rles_to_runs([full, *small], H, W)
    assert _intersections_by_runs(t, p, max_pairs_per_run=1) is None
    iou = iou_matrix(small, [full, *small], H, W)
    np.testing.assert_allclose(iou[:, 0], 9 / (H * W))
    np.testing.assert_array_equal(iou[:, 1:], np.eye(len(small)))


def test_cli_unknown_id(tmp_path, capsys):
    sub = write_submission(tmp_path / "sub.csv", {"0030fd0e6378": [], "not_an_image": [rect(0, 0, 2, 2)]})
    assert main(["score", "--truth", str(REAL_CSV), "--pred", str(sub)]) == 2
    err = capsys.readouterr().err
    assert "sub.csv, line 3" in err and "'not_an_image'" in err and err.count("\n") == 1


def test_cli_malformed_rle(tmp_path, capsys, real_truth):
    a = real_truth["01ae5a43a2ab"].rles
    sub = write_submission(
        tmp_path / "sub.csv", {"0030fd0e6378": [], "01ae5a43a2ab": [a[0], a[1], "5 3 1 2"]}
    )
    assert main(["score", "--truth", str(REAL_CSV), "--pred", str(sub), "--json"]) == 2
    err = capsys.readouterr().err
    assert "sub.csv, line 5" in err and "'01ae5a43a2ab'" in err and "unsorted" in err
    assert err.count("\n") == 1
    # a malformed truth RLE is located in the truth file
    truth = write_csv(tmp_path / "t.csv", ["id", "annotation", "width", "height"], [["x", "1 2 3", W, H]])
    sub = write_submission(tmp_path / "s2.csv", {"x": []})
    assert main(["score", "--truth", str(truth), "--pred", str(sub)]) == 2
    err = capsys.readouterr().err
    assert "t.csv, line 2" in err and "'x'" in err and "odd number" in err


def test_cli_missing_file(tmp_path, capsys):
    assert main(["score", "--truth", str(tmp_path / "nope.csv"), "--pred", str(tmp_path / "x.csv")]) == 2
    assert "nope.csv" in capsys.readouterr().err


def test_score_command_imports_nothing_heavy(tmp_path):
    """``cellmask score`` starts fast (its start-up is part of what a user waits for): it
    imports neither torch, cv2 nor PIL, on the scanner's path and on the general parser's."""
    plain = _write_text(tmp_path / "plain.csv", "id,predicted", [f"0030fd0e6378,{rect(0, 0, 3, 3)}"])
    quoted = _write_text(tmp_path / "quoted.csv", "id,predicted", [f'"0030fd0e6378","{rect(0, 0, 3, 3)}"'])
    code = (
        "import sys; from cellmask.cli import main; "
        f"codes = [main(['score', '--truth', {str(REAL_CSV)!r}, '--pred', p]) for p in sys.argv[1:]]; "
        "heavy = ('torch', 'torchvision', 'timm', 'cv2', 'PIL', 'matplotlib', 'pandas', 'pycocotools'); "
        "print(codes, [m for m in heavy if m in sys.modules])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(plain), str(quoted)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[0, 0] []"


def test_plot_per_threshold(real_truth):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from cellmask.metric import plot_per_threshold

    report = score_submission(real_truth, {k: v.rles for k, v in real_truth.items()})
    ax = plot_per_threshold(report)
    assert len(ax.lines) == 1
    np.testing.assert_allclose(ax.lines[0].get_ydata(), 1.0)


def test_truth_and_predictions_that_touch_nowhere_score_zero():
    """Both sides present, no pair overlapping: every truth is a FN, every prediction a FP."""
    report = score_submission({"a": TruthImage(10, 10, "cort", ["1 5", "21 3"])}, {"a": ["51 5", "81 2"]})
    assert report.score == 0.0
    assert report.per_class["cort"] == 0.0
