"""docs/PAPER.md (the paper's stated values, one row each with its section) against the resolved
configs of every notebook's training stages and the predict config: they must agree.

The stages are resolved as the notebooks resolve them (:func:`cellmask.kaggle.session.stage_config`,
profile ``paper``): 01 pretrains every branch on LIVECell (Soft Teacher's as its plain Faster
R-CNN with the detectors' recipe), 02-04 fine-tune the supervised branches and the baseline,
05 trains Soft Teacher, 06 the segmenter's two stages."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from cellmask.kaggle.session import NotebookPaths, stage_config

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "PAPER.md"
SUPERVISED = (
    "faster_rcnn_swin_t",
    "cascade_rcnn_resnext101",
    "cascade_rcnn_resnest101",
    "cascade_mask_rcnn_resnext101",
)
BRANCHES = (*SUPERVISED[:3], "soft_teacher_resnext101")
AUGMENT_OPS = ("hflip", "vflip", "shift_scale_rotate", "brightness_contrast", "gaussian_blur", "median_blur")


def read_table(path: Path = TABLE) -> list[dict[str, str]]:
    """The rows of the table (``stage``, ``key``, ``value``, ``section``, ``note``)."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(head, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[1:]
    ]


ROWS = read_table()


def stages() -> dict[str, list[dict[str, Any]]]:
    """Every resolved config of every stage a notebook trains, by table stage."""
    paths = NotebookPaths(data=ROOT, out=ROOT / "runs", configs=ROOT / "configs")
    out: dict[str, list[dict[str, Any]]] = {
        "detector/livecell": [stage_config(paths, b, "livecell") for b in BRANCHES],
        "detector/sartorius": [stage_config(paths, b, "sartorius") for b in SUPERVISED],
        "soft_teacher/sartorius": [stage_config(paths, "soft_teacher_resnext101", "sartorius")],
        "segmenter/livecell": [stage_config(paths, "segmenter_upernet_swin_t", "livecell")],
        "segmenter/sartorius": [stage_config(paths, "segmenter_upernet_swin_t_finetune", "sartorius")],
    }
    return out


STAGES = stages()


def get(cfg: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def parse(value: str) -> Any:
    if re.fullmatch(r"\d+-\d+", value):
        lo, hi = value.split("-")
        return range(int(lo), int(hi) + 1)
    if "," in value and ":" not in value:
        return [parse(v.strip()) for v in value.split(",")]
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value, value)


def enabled_augment(cfg: dict[str, Any]) -> set[str]:
    if "crops" in cfg and cfg.get("model", {}).get("type") == "segmenter":
        crops = cfg["crops"]
        return {k for k in ("hflip", "vflip", "rot90") if crops.get(k)} - (
            {"vflip"} if crops.get("rot90") else set()
        )
    augment = cfg.get("augment") or {}
    return {k for k in AUGMENT_OPS if augment.get(k)}


def check(cfg: dict[str, Any], row: dict[str, str]) -> None:
    key, value = row["key"], row["value"]
    if key == "augment" and value == "[22]":
        semi = cfg["semi"]
        assert semi["labeled"] is not None, "the labeled images get [22]'s pipeline"
        assert {"color", "geometric", "erase"} <= {k for k, v in semi["strong"].items() if v}
        assert semi["weak"]["rand_resize"] == semi["strong"]["rand_resize"] and semi["weak"]["hflip"] == 0.5
        return
    if key == "augment":
        assert enabled_augment(cfg) == {v.strip() for v in value.split(",")}, row
        return
    if key == "model.transform":
        h, w = (int(v) for v in value.split("x"))
        assert (cfg["model"]["transform"]["min_size"], cfg["model"]["transform"]["max_size"]) == (h, w), row
        return
    if key == "crops.every_instance":
        assert cfg["crops"]["chunk_size"] and not cfg["crops"].get("max_instances"), row
        return
    expected, actual = parse(value), get(cfg, key)
    if isinstance(expected, range):
        assert actual in expected, (row, actual)
    elif isinstance(expected, list):
        assert list(actual) == expected, (row, actual)
    else:
        assert actual == pytest.approx(expected) if isinstance(expected, float) else actual == expected, (
            row,
            actual,
        )


def test_the_table_names_a_section_for_every_value():
    assert len(ROWS) >= 35
    assert all(re.fullmatch(r"\d(\.\d)*", r["section"]) for r in ROWS)
    assert {r["stage"] for r in ROWS} == {*STAGES, "branch", "predict"}


@pytest.mark.parametrize(
    "row", [r for r in ROWS if r["stage"] in STAGES], ids=lambda r: f"{r['stage']}:{r['key']}"
)
def test_every_notebook_stage_resolves_to_the_papers_value(row):
    for cfg in STAGES[row["stage"]]:
        check(cfg, row)


def test_soft_teachers_livecell_stage_is_the_detectors_recipe_batch_included():
    """The paper pretrains the Faster R-CNN inside Soft Teacher on LIVECell like the supervised
    branches: notebook 01's stage for it must not keep Soft Teacher's own batch of 1 groups."""
    soft, swin = STAGES["detector/livecell"][3], STAGES["detector/livecell"][0]
    assert soft["model"]["type"] == "faster_rcnn" and "semi" not in soft
    assert soft["train"] == swin["train"] and soft["augment"] == swin["augment"]


@pytest.mark.parametrize("row", [r for r in ROWS if r["stage"] == "branch"], ids=lambda r: r["key"])
def test_branch_values(row):
    from cellmask.config import load_config

    branch, key = row["key"].split(".", 1)
    assert get(load_config(ROOT / "configs" / f"{branch}.yaml", "paper"), key) == parse(row["value"])


@pytest.mark.parametrize("row", [r for r in ROWS if r["stage"] == "predict"], ids=lambda r: r["key"])
def test_the_paper_exact_predict_config(row):
    from cellmask.predict.options import load_predict_config

    options = load_predict_config(ROOT / "configs" / "predict.yaml", paper_exact=True)
    if row["key"] == "score_thresholds":
        pairs = dict(p.split() for p in row["value"].split(", "))
        assert options["score_thresholds"] == {k: float(v) for k, v in pairs.items()}
    else:
        assert get(options, row["key"]) == parse(row["value"])
