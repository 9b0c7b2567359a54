"""The ensemble predictor end to end with smoke runs: today's single-branch output kept exactly,
a checked submission on the real test images (with no socket opened), and the inputs a user
may give it by mistake (other sizes, corrupt or colour images, an empty folder)."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from _predict_helpers import (
    BRANCH_CONFIGS,
    PERMISSIVE,
    SEGMENTER_CONFIG,
    block_network,
    branch_config,
    build,
    run_config,
    save_run,
    silence_detector,
)

from cellmask.data.datasets import image_to_tensor
from cellmask.data.images import read_image
from cellmask.data.rle import rle_decode
from cellmask.errors import DataError
from cellmask.predict import (
    Branch,
    Predictor,
    image_class,
    load_detector,
    load_predict_config,
    load_segmenter,
    predict_config,
    predict_folder,
)
from cellmask.predict.postprocess import filter_by_score, postprocess_instances

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    # the configs say pretrained: true, as paper runs do: loading must not fetch ImageNet weights
    out = {
        f"b{i}": save_run(root / f"b{i}", branch_config(name, weight=w), seed=i, pretrained=True)
        for i, (name, w) in enumerate(zip(BRANCH_CONFIGS, (2, 3, 3), strict=True))
    }
    out["seg"] = save_run(root / "seg", run_config(SEGMENTER_CONFIG), pretrained=True)
    silent_cfg = branch_config(BRANCH_CONFIGS[0])
    out["silent"] = save_run(root / "silent", silent_cfg, silence_detector(build(silent_cfg)))
    return out


@pytest.fixture()
def no_network(monkeypatch):
    """Any socket (or name lookup) during the test is an error."""
    block_network(monkeypatch)


# ------------------------------------------------------------------------------ today's output


@torch.no_grad()
def _todays_predict_image(detector, segmenter, image, cfg):
    """``cellmask.predict.predict_image`` as it was before the ensemble (commit bbb1876): one
    forward of the detector, the class vote, thresholds, the segmenter on the kept boxes,
    then dense post-processing. Kept verbatim as the oracle of the single-branch path."""
    opts = predict_config(cfg)
    height, width = image.shape[-2:]
    out = detector.eval()([image_to_tensor(image)])[0]
    boxes, scores, labels = out["boxes"].float(), out["scores"].float(), out["labels"].long()
    label = image_class(labels, scores, float(opts["vote_min_score"]))
    if label is None:
        return np.zeros((0, height, width), bool), np.zeros(0, np.float32), np.zeros(0, np.int64)
    scores_np = scores.numpy().astype(np.float32)
    labels_np = np.full(len(scores_np), label, dtype=np.int64)
    keep = np.flatnonzero(filter_by_score(scores_np, labels_np, opts["score_thresholds"]))
    if keep.size == 0:
        return np.zeros((0, height, width), bool), np.zeros(0, np.float32), np.zeros(0, np.int64)
    masks, _ = segmenter.predict(
        image_to_tensor(image), boxes[torch.from_numpy(keep)], threshold=opts["mask_threshold"], dense=True
    )
    return postprocess_instances(
        masks.numpy(), scores_np[keep], labels_np[keep], thresholds=None, min_area=opts["min_area"]
    )


@pytest.mark.parametrize("options", [{}, {"score_thresholds": 0.0, "min_area": 4, "vote_min_score": 0.0}])
def test_one_branch_without_tta_is_todays_single_branch_output(runs, real_root, options):
    detector, _ = load_detector(runs["b1"])
    segmenter, _ = load_segmenter(runs["seg"])
    image = read_image(real_root / "train" / "0030fd0e6378.png")
    masks, scores, labels = _todays_predict_image(detector, segmenter, image, options)
    pred = Predictor([Branch("b1", detector)], segmenter, {**options, "tta": False, "device": "cpu"})
    inst = pred.predict_image(image)
    if options:
        assert len(masks) > 0, "the permissive case must keep instances to compare"
    np.testing.assert_array_equal(inst.dense(), masks)
    np.testing.assert_array_equal(inst.scores, scores)
    np.testing.assert_array_equal(inst.labels, labels)
    assert inst.scores.dtype == scores.dtype == np.float32


# ------------------------------------------------------------------------------ real test images


def test_predict_real_test_images_writes_a_checked_submission_without_network(
    runs, real_root, tmp_path, no_network, capsys
):
    from cellmask.cli import main

    out = tmp_path / "sub" / "submission.csv"
    branches = [runs["b0"], runs["b1"], runs["b2"]]
    result = predict_folder(
        real_root / "test", branches, runs["seg"], out, device="cpu", cache=tmp_path / "cache",
        overrides=PERMISSIVE, progress=False,
    )  # fmt: skip
    assert result.ok and result.problems == []
    assert sum(result.instances.values()) > 0
    assert main(["check-submission", str(out), "--images", str(real_root / "test")]) == 0
    ids = {row["id"] for row in csv.DictReader(out.open())}
    assert ids == {p.stem for p in (real_root / "test").glob("*.png")}
    # the resolved config is written beside it and reproduces the submission through the CLI
    assert result.config == out.with_name("submission.predict.yaml")
    assert load_predict_config(result.config) == {**result.options, "device": None}  # not pinned
    assert [b["weight"] for b in result.runs["branches"]] == [2.0, 3.0, 3.0]
    again = tmp_path / "again.csv"
    argv = ["predict", "--images", str(real_root / "test"), "--runs", *map(str, branches)]
    argv += ["--segmenter", str(runs["seg"]), "--out", str(again), "--config", str(result.config)]
    argv += ["--cache", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(argv) == 0
    assert again.read_text() == out.read_text()
    printed = capsys.readouterr().out
    assert "cellmask predict: 3 images" in printed and "(valid)" in printed


def test_images_of_other_sizes_get_masks_at_their_own_size(runs, real_root, tmp_path):
    image = read_image(real_root / "test" / "7ae19de7bc2a.png")
    folder = tmp_path / "sizes"
    folder.mkdir()
    cv2.imwrite(str(folder / "small.png"), cv2.resize(image, (352, 260), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(folder / "large.png"), np.pad(image, ((0, 80), (0, 96)), mode="reflect"))
    result = predict_folder(
        folder, [runs["b0"], runs["b1"]], runs["seg"], tmp_path / "s.csv", device="cpu",
        overrides=PERMISSIVE, progress=False,
    )  # fmt: skip
    assert result.ok, result.problems
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    for name, (h, w) in (("small", (260, 352)), ("large", (600, 800))):
        rles = [r["predicted"] for r in rows if r["id"] == name and r["predicted"]]
        assert len(rles) == result.instances[name] > 0
        masks = np.stack([rle_decode(r, h, w) for r in rles])
        assert masks.sum(0).max() == 1  # disjoint in the image's own pixel grid


def test_an_image_without_detections_gets_one_empty_row(runs, real_root, tmp_path):
    result = predict_folder(
        real_root / "test", [runs["silent"]], runs["seg"], tmp_path / "s.csv", device="cpu"
    )
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert len(rows) == 3 and all(r["predicted"] == "" for r in rows)
    assert result.ok and set(result.instances.values()) == {0}


def test_bad_image_folders_fail_with_one_clear_error(runs, real_root, tmp_path):
    good = real_root / "test" / "7ae19de7bc2a.png"
    args = ([runs["b0"]], runs["seg"], tmp_path / "s.csv")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"{empty}: no images"):
        predict_folder(empty, *args, device="cpu")

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "a.png").write_bytes(good.read_bytes())
    (garbage / "bad.png").write_bytes(b"not a png at all" * 20)
    with pytest.raises(DataError, match=r"bad\.png"):
        predict_folder(garbage, *args, device="cpu")

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "cut.png").write_bytes(good.read_bytes()[:2000])  # a valid header, then nothing
    with pytest.raises(DataError, match=r"cut\.png"):
        predict_folder(truncated, *args, device="cpu")

    gray = read_image(good)
    colour = tmp_path / "colour"
    colour.mkdir()
    rgb = np.stack([gray, gray // 2, 255 - gray], axis=-1)
    cv2.imwrite(str(colour / "rgb.png"), rgb)
    with pytest.raises(DataError, match=r"rgb\.png: is a colour image"):
        predict_folder(colour, *args, device="cpu")

    gray_rgb = tmp_path / "gray_rgb"  # colour file, gray content: accepted
    gray_rgb.mkdir()
    cv2.imwrite(str(gray_rgb / "g.png"), np.stack([gray] * 3, axis=-1))
    assert predict_folder(gray_rgb, *args, device="cpu", progress=False).ok
