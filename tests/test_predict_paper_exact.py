"""``--paper-exact``: the paper's pipeline (MDE-CellMask 5.3.2) as one switch of ``cellmask
predict / evaluate / tune``: its values and their precedence over ``--config`` and ``--set``, what
the saved config records, and the pipeline's behaviour (per-box classes and thresholds, no
minimum area) on an image whose cells say which step ran."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from _predict_helpers import BRANCH_CONFIGS, SEGMENTER_CONFIG, ContentSegmenter, run_config

from cellmask.data.rle import rle_decode
from cellmask.errors import DataError
from cellmask.predict import PREDICT_DEFAULTS, Predictor, load_predict_config
from cellmask.predict.options import (
    PAPER_EXACT,
    is_paper_exact,
    paper_exact_differences,
    paper_weight_problems,
)
from cellmask.predict.postprocess import DEFAULT_MIN_AREA

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER_BRANCHES = (*BRANCH_CONFIGS, "soft_teacher_resnext101.yaml")

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ the options


def test_configs_predict_yaml_lists_every_option_with_its_default():
    listed = yaml.safe_load((CONFIGS / "predict.yaml").read_text())["predict"]
    assert list(listed) == list(PREDICT_DEFAULTS)  # every key, in the code's order
    for key in ("wbf", "batch_size"):
        assert list(listed[key]) == list(PREDICT_DEFAULTS[key]), key
    assert listed == PREDICT_DEFAULTS


def test_paper_exact_values_and_what_differs_from_the_defaults():
    exact = load_predict_config(None, None, paper_exact=True)
    assert {k: exact[k] for k in PAPER_EXACT} == PAPER_EXACT
    assert exact["tta_fusion"] == "per_model" and exact["class_vote"] is False and exact["min_area"] == 0
    assert exact["score_thresholds"] == {"shsy5y": 0.25, "cort": 0.55, "astro": 0.35}
    assert exact["wbf"] == {"iou_thr": 0.6, "skip_box_thr": 0.01, "conf_type": "avg"}
    assert is_paper_exact(exact) and not is_paper_exact(PREDICT_DEFAULTS)
    # the defaults add the class vote and minimum areas (TTA is fused per model in both)
    assert paper_exact_differences(PREDICT_DEFAULTS) == ["class_vote", "min_area"]
    # equal in effect counts as equal: per-class zeros, the vote's settings without the vote
    same = {**exact, "min_area": dict.fromkeys(DEFAULT_MIN_AREA, 0), "vote_before_wbf": True}
    assert is_paper_exact(same)
    assert not is_paper_exact({**exact, "score_thresholds": 0.25})


def test_paper_exact_wins_over_the_config_and_the_config_is_named(tmp_path, caplog):
    config = tmp_path / "tuned.predict.yaml"
    config.write_text(
        "predict:\n  score_thresholds: {cort: 0.7}\n  min_area: 5\n  mask_threshold: 0.6\n"
        "  batch_size: {images: 3}\n"
    )
    plain = load_predict_config(config)
    assert plain["score_thresholds"]["cort"] == 0.7 and plain["min_area"] == 5
    with caplog.at_level(logging.WARNING, logger="cellmask.predict"):
        exact = load_predict_config(config, ["predict.batch_size.detector=4"], paper_exact=True)
    assert is_paper_exact(exact)
    assert exact["score_thresholds"]["cort"] == 0.55 and exact["min_area"] == 0
    assert exact["mask_threshold"] is None
    assert exact["batch_size"] == {"images": 3, "detector": 4, "segmenter": None}  # not the pipeline's
    (warning,) = [r.getMessage() for r in caplog.records if "--paper-exact" in r.getMessage()]
    assert str(config) in warning
    assert all(k in warning for k in ("score_thresholds", "mask_threshold", "min_area"))


def test_a_set_agreeing_with_paper_exact_passes():
    agreeing = [
        "predict.min_area.cort=0",
        "predict.min_area=0",
        "predict.score_thresholds.astro=0.35",
        "predict.wbf.iou_thr=0.6",
        "predict.tta_fusion=per_model",
        "predict.class_vote=false",
    ]
    assert is_paper_exact(load_predict_config(None, agreeing, paper_exact=True))


@pytest.mark.parametrize(
    "override",
    [
        "predict.class_vote=true",
        "predict.min_area=4",
        "predict.min_area.astro=150",
        "predict.score_thresholds=0.3",
        "predict.score_thresholds.cort=0.6",
        "predict.wbf.iou_thr=0.5",
        "predict.tta_fusion=views",
        "predict.rescore=true",
        "predict.tta=false",
        "predict.mask_threshold=0.6",
    ],
)
def test_a_set_contradicting_paper_exact_is_an_error(override):
    key = override.partition("=")[0]
    with pytest.raises(DataError, match=rf"--set {key}=.* contradicts --paper-exact, which fixes {key}"):
        load_predict_config(None, [override], paper_exact=True)
    load_predict_config(None, [override])  # fine without the switch


def test_paper_weight_problems():
    paper = {"Faster R-CNN Swin-T": 2, "Cascade R-CNN ResNeXt-101": 3}
    paper |= {"Cascade R-CNN ResNeSt-101": 3.0, "Soft Teacher ResNeXt-101": 1}
    assert paper_weight_problems(paper) == []
    problems = paper_weight_problems({**paper, "Soft Teacher ResNeXt-101": 2, "Mine": 1})
    problems += paper_weight_problems({"Faster R-CNN Swin-T": 2})
    assert any("Soft Teacher ResNeXt-101: WBF weight 2, the paper's is 1" in p for p in problems)
    assert "Mine: not one of the paper's branches" in problems
    assert "Cascade R-CNN ResNeSt-101: missing" in problems


# ------------------------------------------------------------------------------ the pipeline


class LabelledBlobs(torch.nn.Module):
    """A detector that finds every blob brighter than 0.3 (its tight pixel-edge box), labelled
    and scored by its gray level: > 0.8 cort 0.9, > 0.6 astro 0.4, else shsy5y 0.3. It reads the
    content, so a flipped view gives the same boxes. ``calls`` counts images seen (all instances)."""

    calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images, targets=None):
        out = []
        for image in images:
            LabelledBlobs.calls += 1
            gray = image[0].detach().cpu().numpy()
            n, comp, stats, _ = cv2.connectedComponentsWithStats(
                (gray > 0.3).astype(np.uint8), connectivity=4
            )
            boxes, scores, labels = [], [], []
            for k in range(1, n):
                x, y, w, h, _ = stats[k]
                level = float(gray[comp == k].mean())
                label, score = (2, 0.9) if level > 0.8 else (3, 0.4) if level > 0.6 else (1, 0.3)
                boxes.append([x, y, x + w, y + h])
                scores.append(score)
                labels.append(label)
            out.append(
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "scores": torch.tensor(scores, dtype=torch.float32),
                    "labels": torch.tensor(labels, dtype=torch.int64),
                }
            )
        return out


def _cells() -> np.ndarray:
    """A cort cell (gray 230, 20x20), an astro cell (180, 20x20) and a small shsy5y cell (120,
    6x6 = 36 pixels, under shsy5y's default minimum area of 80)."""
    image = np.zeros((64, 96), np.uint8)
    image[5:25, 5:25] = 230
    image[5:25, 40:60] = 180
    image[40:46, 70:76] = 120
    return image


@pytest.fixture()
def paper_runs(tmp_path, monkeypatch) -> dict:
    """The four branch runs (their configs' names and weights 2, 3, 3, 1) and a segmenter run,
    loaded as :class:`LabelledBlobs` and a :class:`ContentSegmenter` (the run files are real; the
    checkpoints are never read), and a folder holding :func:`_cells`."""
    from cellmask.config import save_config

    def run(name: str, config: dict) -> Path:
        out = tmp_path / "runs" / name
        out.mkdir(parents=True)
        save_config(config, out / "config.yaml")
        (out / "best.pt").write_bytes(b"stand-in: the loader is replaced")
        return out

    def load(spec, expect, device="cpu"):
        return LabelledBlobs() if expect == "detector" else ContentSegmenter(inside=0.8, outside=0.1)

    monkeypatch.setattr("cellmask.predict.runs.load_run_model", load)
    monkeypatch.setattr("cellmask.predict.predictor.load_run_model", load)
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "cells.png"), _cells())
    return {
        "branches": [str(run(Path(n).stem, run_config(n))) for n in PAPER_BRANCHES],
        "segmenter": str(run("segmenter", run_config(SEGMENTER_CONFIG))),
        "images": str(images),
        "cache": str(tmp_path / "cache"),
    }


def _instances(submission: Path) -> list[np.ndarray]:
    rows = list(csv.DictReader(submission.open()))
    return [rle_decode(r["predicted"], 64, 96) for r in rows if r["predicted"]]


def test_cli_predict_paper_exact_keeps_per_box_classes_and_small_cells(paper_runs, tmp_path, capsys):
    from cellmask.cli import main

    common = ["predict", "--images", paper_runs["images"], "--runs", *paper_runs["branches"]]
    common += ["--segmenter", paper_runs["segmenter"], "--device", "cpu", "--cache", paper_runs["cache"]]

    # as configured (class vote, minimum areas): the vote says cort, so the astro cell (0.4) and
    # the small one (0.3) fall under cort's 0.55; only the cort cell is left
    LabelledBlobs.calls = 0
    assert main([*common, "--out", str(tmp_path / "default.csv")]) == 0
    default = yaml.safe_load((tmp_path / "default.predict.yaml").read_text())
    assert default["paper_exact"] is False and default["predict"]["class_vote"] is True
    assert [int(m.sum()) for m in _instances(tmp_path / "default.csv")] == [400]
    detected = LabelledBlobs.calls
    assert detected == 4 * 2  # four branches, two views of one image

    # --paper-exact: each box keeps its class and threshold (astro 0.4 >= 0.35, shsy5y 0.3 >=
    # 0.25) and the 36-pixel cell stays (no minimum area)
    exact_csv = tmp_path / "exact.csv"
    assert main([*common, "--out", str(exact_csv), "--paper-exact"]) == 0
    assert "the paper's pipeline (paper-exact)" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "exact.predict.yaml").read_text())
    assert saved["paper_exact"] is True
    assert {k: saved["predict"][k] for k in PAPER_EXACT} == PAPER_EXACT
    assert [b["weight"] for b in saved["runs"]["branches"]] == [2.0, 3.0, 3.0, 1.0]
    areas = sorted(int(m.sum()) for m in _instances(exact_csv))
    assert len(areas) == 3 and areas[0] < DEFAULT_MIN_AREA["shsy5y"] and areas[1:] == [400, 400]
    # the other TTA fusion came from the cached per-view detections: no detector ran again
    assert LabelledBlobs.calls == detected

    # the saved config reproduces the run without the switch
    assert (
        main(
            [*common, "--out", str(tmp_path / "again.csv"), "--config", str(tmp_path / "exact.predict.yaml")]
        )
        == 0
    )
    assert (tmp_path / "again.csv").read_text() == exact_csv.read_text()

    # a --set contradicting the switch stops before any model is loaded, naming both
    assert (
        main([*common, "--out", str(tmp_path / "x.csv"), "--paper-exact", "--set", "predict.min_area=80"])
        == 2
    )
    assert "predict.min_area=80 contradicts --paper-exact" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_paper_exact_predictor_keeps_each_boxs_class(paper_runs):
    image = _cells()
    exact = Predictor.from_runs(
        paper_runs["branches"], paper_runs["segmenter"], device="cpu", paper_exact=True
    )
    inst = exact.predict_image(image)
    assert inst.labels.tolist() == [2, 3, 1] and inst.scores.tolist() == pytest.approx([0.9, 0.4, 0.3])
    assert inst.areas().tolist()[2] < DEFAULT_MIN_AREA["shsy5y"]
    voted = Predictor.from_runs(paper_runs["branches"], paper_runs["segmenter"], device="cpu").predict_image(
        image
    )
    assert voted.labels.tolist() == [2]


def test_paper_exact_warns_about_branches_that_are_not_the_papers(paper_runs, caplog):
    with caplog.at_level(logging.WARNING, logger="cellmask.predict"):
        Predictor.from_runs(
            paper_runs["branches"][:2], paper_runs["segmenter"], device="cpu", paper_exact=True
        )
    assert "Cascade R-CNN ResNeSt-101: missing" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cellmask.predict"):
        Predictor.from_runs(paper_runs["branches"], paper_runs["segmenter"], device="cpu", paper_exact=True)
    assert "--paper-exact" not in caplog.text


@pytest.mark.parametrize("command", ["evaluate", "tune"])
@pytest.mark.parametrize("flag", [True, False])
def test_evaluate_and_tune_pass_paper_exact_to_the_predictor(command, flag, monkeypatch, tmp_path):
    from cellmask.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def stop(data, runs, segmenter, split="val", **options):
        seen.update(options)
        raise Stop

    monkeypatch.setattr("cellmask.evaluate.run.predictor_and_records", stop)
    argv = [command, "--data", str(tmp_path), "--runs", "r1", "r2", "--segmenter", "s"]
    with pytest.raises(Stop):
        main([*argv, "--paper-exact"] if flag else argv)
    assert seen["paper_exact"] is flag
