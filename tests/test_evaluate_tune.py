"""`cellmask evaluate` (the ablation) and `cellmask tune` (the threshold search)."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from _predict_helpers import (
    BRANCH_CONFIGS,
    PERMISSIVE,
    SEGMENTER_CONFIG,
    BlobDetector,
    ContentSegmenter,
    branch_config,
    run_config,
    save_run,
)

from cellmask.data.records import ImageRecord
from cellmask.data.rle import rle_encode
from cellmask.evaluate import ablation_rows, evaluate, evaluate_predictor, load_eval_records
from cellmask.evaluate.rows import settings_of
from cellmask.evaluate.tune import tune_predictor
from cellmask.predict import PREDICT_DEFAULTS, Branch, Predictor, load_predict_config
from cellmask.predict.pipeline import own_masks

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ tune


def _planted_records(root: Path, n_images: int = 4) -> list[ImageRecord]:
    """Images with bright 20x20 cells (the truth) and dim 16x16 look-alikes (not cells)."""
    rng = np.random.default_rng(0)
    records = []
    for k in range(n_images):
        image = np.zeros((96, 128), np.uint8)
        rles = []
        slots = rng.permutation([(y, x) for y in (4, 36, 68) for x in (4, 36, 68, 100)])[:5]
        for j, (y, x) in enumerate(slots):
            if j < 3:
                image[y : y + 20, x : x + 20] = 230
                mask = np.zeros_like(image, bool)
                mask[y : y + 20, x : x + 20] = True
                rles.append(rle_encode(mask))
            else:
                image[y : y + 16, x : x + 16] = 120
        path = root / f"img{k}.png"
        cv2.imwrite(str(path), image)
        records.append(
            ImageRecord(
                f"img{k}",
                path,
                96,
                128,
                "shsy5y",
                labels=np.ones(len(rles), np.int64),
                segmentations=rles,
                seg_format="rle",
            )
        )
    return records


def test_tune_finds_the_planted_thresholds(tmp_path):
    records = _planted_records(tmp_path)
    # true cells score 0.8, look-alikes 0.45 (above shsy5y's 0.25: false positives); boxes are
    # 3 px too large, and the segmenter gives their halo 0.55 (above the default mask threshold
    # 0.5: masks too large, IoU ~0.6 instead of ~1)
    predictor = Predictor(
        [Branch("blobs", BlobDetector(hi=0.8, lo=0.45, pad=3))],
        ContentSegmenter(inside=0.8, outside=0.55),
        {"device": "cpu", "tta": False, "min_area": 0},
    )
    result = tune_predictor(
        predictor,
        records,
        score_grid=(0.25, 0.4, 0.5, 0.6, 0.9),
        mask_grid=(0.5, 0.7),
        out=tmp_path / "tune",
        progress=False,
    )
    assert 0.45 < result.best["score_thresholds"]["shsy5y"] <= 0.8
    assert result.best["mask_threshold"] == 0.7
    # classes without images keep their configured thresholds
    assert (
        result.best["score_thresholds"]["cort"] == 0.55 and result.best["score_thresholds"]["astro"] == 0.35
    )
    assert result.default_score < 0.3 and result.score > 0.9 and result.gain > 0.6
    assert result.search_score == pytest.approx(result.score, abs=0.02)  # float16 search ~ exact
    # memoised: each image is scored once per (mask threshold, its class's threshold): 2 x 7
    # (the grid plus the configured 0.35 and 0.55), not once per point of the 2 x 7^3 grid
    assert result.evaluations <= len(records) * 2 * 7 < result.grid_points
    tuned = load_predict_config(result.config)
    assert tuned["score_thresholds"] == result.best["score_thresholds"] and tuned["mask_threshold"] == 0.7
    assert tuned["tta"] is False and tuned["min_area"] == 0  # the rest as configured
    assert (tmp_path / "tune" / "tune.png").stat().st_size > 1000
    assert "gain +" in result.summary()


def test_tune_keeps_the_configured_values_when_nothing_beats_them(tmp_path):
    # a segmenter that never fires: every grid point scores 0, a tie with the configured values
    predictor = Predictor(
        [Branch("blobs", BlobDetector(hi=0.8, lo=0.45, pad=3))],
        ContentSegmenter(inside=0.0, outside=0.0),
        {"device": "cpu", "tta": False, "min_area": 0},
    )
    result = tune_predictor(
        predictor,
        _planted_records(tmp_path, n_images=2),
        score_grid=(0.1, 0.9),
        mask_grid=(0.3, 0.7),
        out=tmp_path / "tune",
        progress=False,
    )
    assert result.score == result.default_score == 0.0
    assert result.best == {
        "score_thresholds": result.configured["score_thresholds"],
        "mask_threshold": result.configured["mask_threshold"],
    }


def test_tune_without_class_vote_searches_each_class(tmp_path):
    records = _planted_records(tmp_path, 2)
    predictor = Predictor(
        [Branch("blobs", BlobDetector(hi=0.8, lo=0.45, label=3))],
        ContentSegmenter(inside=0.8, outside=0.2),
        {"device": "cpu", "tta": False, "min_area": 0, "class_vote": False},
    )
    for r in records:
        r.cell_type = "astro"
    result = tune_predictor(
        predictor, records, score_grid=(0.3, 0.5), mask_grid=(0.5,), progress=False, verify=False
    )
    assert (
        result.best["score_thresholds"]["astro"] == 0.5 and result.best["score_thresholds"]["shsy5y"] == 0.25
    )


# ------------------------------------------------------------------------------ evaluate


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {
        f"b{i}": save_run(root / f"b{i}", branch_config(n, weight=w), seed=i)
        for i, (n, w) in enumerate(zip(BRANCH_CONFIGS[:2], (2, 3), strict=True))
    }
    out["seg"] = save_run(root / "seg", run_config(SEGMENTER_CONFIG))
    out["baseline"] = save_run(root / "mask", branch_config("cascade_mask_rcnn_resnext101.yaml"))
    return out


def test_eval_records_are_the_training_split(runs, real_root):
    from cellmask.predict import resolve_run
    from cellmask.training.split import load_split

    cfg = resolve_run(runs["b0"]).config
    val = load_eval_records(real_root, [cfg], "val")
    assert [r.image_id for r in val] == [r.image_id for r in load_split(cfg, real_root, "sartorius")[1]]
    assert 0 < len(val) < 6 and len(load_eval_records(real_root, [cfg], "all")) == 6


def test_evaluate_ablation_rows_files_and_consistency_with_predict(runs, real_root, tmp_path):
    out = tmp_path / "eval"
    result = evaluate(
        real_root, [runs["b0"], runs["b1"]], runs["seg"], "val", True, out,
        baseline=runs["baseline"], device="cpu", overrides=PERMISSIVE, progress=False,
    )  # fmt: skip
    names = [r.row.name for r in result.rows]
    assert names[:3] == [
        "Faster R-CNN Swin-T + segmenter",
        "Cascade R-CNN ResNeXt-101 + segmenter",
        "Cascade Mask R-CNN ResNeXt-101 (own masks)",
    ]
    assert {"ensemble, no TTA", "ensemble + TTA", "ensemble + TTA + re-scoring"} <= set(names)
    assert any("class vote" in n for n in names)
    configured = [r for r in result.rows if r.row.configured]
    assert len(configured) == 1 and configured[0].row.name == "ensemble + TTA"
    # the paper's pipeline is labelled as such, and both readings of TTA fusion are scored
    exact = next(r for r in result.rows if r.row.name == "ensemble + TTA, paper-exact (5.3.2)")
    assert [r.row.name for r in result.rows if r.settings["paper_exact"]] == [exact.row.name]
    assert exact.settings == {
        "branches": 2,
        "tta": True,
        "tta_fusion": "per_model",
        "class_vote": False,
        "min_area": False,
        "rescore": False,
        "paper_exact": True,
    }
    views = next(r for r in result.rows if r.row.name == "ensemble + TTA, every view its own WBF entry")
    assert configured[0].settings["tta_fusion"] == "per_model" and views.settings["tta_fusion"] == "views"
    assert views.settings["class_vote"] == configured[0].settings["class_vote"]  # only the fusion differs
    for name in (
        "ablation.md",
        "ablation.csv",
        "ablation_per_class.png",
        "ablation_per_threshold.png",
        "score.json",
    ):
        assert (out / name).is_file(), name
    table = list(csv.DictReader((out / "ablation.csv").open()))
    assert [t["row"] for t in table] == names and {"P@0.50", "P@0.95", "shsy5y"} <= set(table[0])
    assert [t["row"] for t in table if t["paper_exact"] == "True"] == [exact.row.name]
    assert "| tta fusion |" in (out / "ablation.md").read_text()
    assert all(n in (out / "ablation.md").read_text() for n in names)
    assert result.report is configured[0].report and 0.0 <= result.report.score <= 1.0

    # a row is exactly what `predict` gives with the same settings
    records = load_eval_records(
        real_root, [Predictor.from_runs([runs["b0"]], runs["seg"], device="cpu").branches[0].run.config]
    )
    single = Predictor.from_runs(
        [runs["b0"]], runs["seg"], None, [*PERMISSIVE, "predict.tta=false"], device="cpu"
    )
    assert single.predict_records(records, progress=False) == result.rows[0].predictions
    full = Predictor.from_runs([runs["b0"], runs["b1"]], runs["seg"], None, PERMISSIVE, device="cpu")
    assert full.predict_records(records, progress=False) == configured[0].predictions
    assert sum(len(v) for v in configured[0].predictions.values()) > 0


def test_own_masks_accepts_pasted_and_float_masks():
    from cellmask.models.segmenter import paste_masks

    probs = torch.zeros((2, 1, 8, 8))
    probs[:, :, 2:6, 2:6] = 0.9
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0], [10.0, 2.0, 30.0, 14.0]])
    pasted, _ = paste_masks(probs, boxes, (24, 32), 0.5, dense=False)
    dense, _ = paste_masks(probs, boxes, (24, 32), 0.5, dense=True)
    keep = np.array([1, 0])
    for masks in (pasted, dense.float()[:, None]):
        offsets, windows, _ = own_masks(masks, (24, 32))(keep)
        for (y0, x0), win, i in zip(offsets, windows, keep, strict=True):
            full = np.zeros((24, 32), bool)
            full[y0 : y0 + win.shape[0], x0 : x0 + win.shape[1]] = win
            np.testing.assert_array_equal(full, dense[i].numpy())


def test_cli_evaluate_and_tune(runs, real_root, tmp_path, capsys):
    from cellmask.cli import main

    common = [
        "--data",
        str(real_root),
        "--runs",
        str(runs["b0"]),
        "--segmenter",
        str(runs["seg"]),
        "--device",
        "cpu",
    ]
    common += ["--cache", str(tmp_path / "cache"), *[a for o in PERMISSIVE for a in ("--set", o)]]
    assert main(["evaluate", *common, "--out", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out
    assert "cellmask evaluate" in printed and "per threshold" in printed
    assert (
        main(
            [
                "tune",
                *common,
                "--out",
                str(tmp_path / "t"),
                "--score-grid",
                "0.3",
                "0.6",
                "--mask-grid",
                "0.5",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "cellmask tune" in printed and "gain" in printed
    assert load_predict_config(tmp_path / "t" / "tuned.predict.yaml")["mask_threshold"] == 0.5
    assert list((tmp_path / "cache").iterdir())  # the second command reused the first's detections


# ------------------------------------------------------------------------------ ablation rows

BRANCHES = ["Faster R-CNN Swin-T", "Cascade R-CNN ResNeXt-101", "Cascade R-CNN ResNeSt-101"]
EXACT_ROW = "ensemble + TTA, paper-exact (5.3.2)"


def test_ablation_rows_name_the_paper_exact_row_and_both_tta_readings():
    from cellmask.predict.options import PAPER_EXACT

    rows = ablation_rows(BRANCHES, PREDICT_DEFAULTS)  # the default fuses TTA per model
    by_name = {r.name: r for r in rows}
    views_row = "ensemble + TTA, every view its own WBF entry"
    assert [r.name for r in rows if r.configured] == ["ensemble + TTA"]
    assert settings_of(by_name["ensemble + TTA"], PREDICT_DEFAULTS, 3)["tta_fusion"] == "per_model"
    assert by_name[views_row].options == {"tta_fusion": "views"}
    assert dict(by_name[EXACT_ROW].options) == PAPER_EXACT
    flagged = [r.name for r in rows if settings_of(r, PREDICT_DEFAULTS, 3)["paper_exact"]]
    assert flagged == [EXACT_ROW]
    names = [r.name for r in rows]
    assert names.index(views_row) == names.index("ensemble + TTA") + 1
    assert {"paper-exact + class vote", "paper-exact + min area"} <= set(names)
    # configured per view, the other reading is the per-model one
    per_view = {**PREDICT_DEFAULTS, "tta_fusion": "views"}
    other = {r.name: r for r in ablation_rows(BRANCHES, per_view)}["ensemble + TTA fused per model"]
    assert other.options == {"tta_fusion": "per_model"}

    # --paper-exact: the paper's pipeline is the configured row, under its own name (the per-model
    # row would be the same pipeline and is dropped); the 8-entry reading of it stays beside it
    exact = load_predict_config(None, None, paper_exact=True)
    rows = ablation_rows(BRANCHES, exact)
    assert [r.name for r in rows if r.configured] == [EXACT_ROW]
    assert "ensemble + TTA fused per model" not in [r.name for r in rows]
    views = next(r for r in rows if r.name == "ensemble + TTA, every view its own WBF entry")
    assert settings_of(views, exact, 3)["tta_fusion"] == "views"
    assert not settings_of(views, exact, 3)["paper_exact"]


def test_ablation_rows_of_one_branch_have_no_second_tta_reading():
    rows = ablation_rows(BRANCHES[:1], PREDICT_DEFAULTS)
    names = [r.name for r in rows]
    assert "branch + TTA fused per model" not in names and "branch + TTA, paper-exact (5.3.2)" in names
    assert [r.name for r in rows if r.configured] == ["branch + TTA"]
    # with one branch the fusion reading changes nothing: per_model configured is still that row
    rows = ablation_rows(BRANCHES[:1], {**PREDICT_DEFAULTS, "tta_fusion": "per_model"})
    assert [r.name for r in rows if r.configured] == ["branch + TTA"]


def test_evaluate_with_paper_exact_scores_the_papers_pipeline_as_configured(tmp_path):
    records = _planted_records(tmp_path, 2)
    options = {**load_predict_config(None, None, paper_exact=True), "device": "cpu"}
    predictor = Predictor(
        [Branch("a", BlobDetector(hi=0.8, lo=0.45), weight=2), Branch("b", BlobDetector(hi=0.7), weight=1)],
        ContentSegmenter(inside=0.8, outside=0.2),
        options,
    )
    result = evaluate_predictor(predictor, records, tmp_path / "eval", ablation=True, progress=False)
    configured = [r for r in result.rows if r.row.configured]
    assert [r.row.name for r in configured] == [EXACT_ROW] and configured[0].settings["paper_exact"]
    assert result.report is configured[0].report
    saved = load_predict_config(result.files["config"])
    assert {k: saved[k] for k in ("tta_fusion", "class_vote", "min_area")} == {
        "tta_fusion": "per_model",
        "class_vote": False,
        "min_area": 0,
    }
    assert yaml.safe_load(result.files["config"].read_text())["paper_exact"] is True
    # both readings of TTA fusion were scored in the same pass
    fusions = {r.settings["tta_fusion"] for r in result.rows if r.settings["tta"]}
    assert fusions == {"views", "per_model"}
