"""The synthetic dataset: exact Kaggle layout, determinism, readers, and per-class plausibility."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cellmask.cli import main
from cellmask.data.livecell import LIVECELL_CLASSES, livecell_split_files, read_livecell_coco
from cellmask.data.records import polygons_to_mask
from cellmask.data.rle import rle_decode, rle_encode
from cellmask.data.sartorius import list_images, read_train_csv
from cellmask.data.synthetic import (
    CELL_STYLES,
    LIVECELL_STYLES,
    TRAIN_COLUMNS,
    parse_size,
    synth_image,
    write_dataset,
)
from cellmask.errors import DataError

H, W = 208, 272  # small, not square, not the default: catches any H/W mix-up
COUNTS = {"train": 6, "unlabeled": 2, "test": 2, "livecell": 3}


def _synth(out: Path, seed: int = 0, **counts: int) -> int:
    c = {**COUNTS, **counts}
    argv = ["synth", str(out), "--seed", str(seed), "--size", f"{H}x{W}"]
    for name, n in c.items():
        argv += [f"--{name}", str(n)]
    return main(argv)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    assert _synth(root) == 0
    return root


@pytest.fixture(scope="module")
def train_rows(synth_root) -> list[dict[str, str]]:
    with (synth_root / "train.csv").open(newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------- layout


def test_layout_is_exactly_the_kaggle_one(synth_root):
    lc = synth_root / "LIVECell_dataset_2021"
    expected_dirs = {
        "train",
        "train_semi_supervised",
        "test",
        "LIVECell_dataset_2021",
        "LIVECell_dataset_2021/images",
        "LIVECell_dataset_2021/images/livecell_train_val_images",
        "LIVECell_dataset_2021/images/livecell_test_images",
        "LIVECell_dataset_2021/annotations",
        "LIVECell_dataset_2021/annotations/LIVECell",
    }
    dirs = {str(p.relative_to(synth_root)) for p in synth_root.rglob("*") if p.is_dir()}
    assert dirs == expected_dirs
    top_files = {p.name for p in synth_root.iterdir() if p.is_file()}
    assert top_files == {"train.csv", "sample_submission.csv"}
    assert len(list((synth_root / "train").glob("*.png"))) == COUNTS["train"]
    assert len(list((synth_root / "train_semi_supervised").glob("*.png"))) == COUNTS["unlabeled"]
    assert len(list((synth_root / "test").glob("*.png"))) == COUNTS["test"]
    assert {p.name for p in (lc / "annotations" / "LIVECell").iterdir()} == {
        f"livecell_coco_{s}.json" for s in ("train", "val", "test")
    }
    n_tif = len(list((lc / "images").rglob("*.tif")))
    assert n_tif == COUNTS["livecell"]
    # ids: 12 lowercase hex, distinct over all competition folders
    ids = [p.stem for d in ("train", "train_semi_supervised", "test") for p in (synth_root / d).iterdir()]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 12 and all(ch in "0123456789abcdef" for ch in i) for i in ids)


def test_images_are_8bit_gray_of_the_requested_size(synth_root):
    paths = [*synth_root.glob("*/*.png"), *synth_root.rglob("*.tif")]
    assert paths
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image is not None, path
        assert image.dtype == np.uint8 and image.shape == (H, W), path
        assert 118 < image.mean() < 138 and image.std() > 3, path


def test_train_csv_columns_values_and_rles(synth_root, train_rows):
    with (synth_root / "train.csv").open() as f:
        assert f.readline().rstrip("\n") == ",".join(TRAIN_COLUMNS)
    train_ids = {p.stem for p in (synth_root / "train").glob("*.png")}
    assert {r["id"] for r in train_rows} == train_ids
    for row in train_rows:
        assert (row["width"], row["height"]) == (str(W), str(H))
        assert row["cell_type"] in ("shsy5y", "cort", "astro")
        hours = int(row["plate_time"][:2])
        assert row["plate_time"] == f"{hours:02d}h{row['plate_time'][3:5]}m00s"
        assert row["elapsed_timedelta"] == f"0 days {hours:02d}:{row['plate_time'][3:5]}:00"
        np.datetime64(row["sample_date"])  # parses as a date
        mask = rle_decode(row["annotation"], H, W)
        assert mask.any(), "empty instance"
        assert rle_encode(mask) == row["annotation"], "RLE does not round-trip"
    sample_ids = {r["id"]: r["sample_id"] for r in train_rows}
    assert any(s == "" for s in sample_ids.values()), "a few images should have an empty sample_id"
    assert any(s.startswith(("shsy5y[", "cort[", "astro")) and "_Vessel-" in s for s in sample_ids.values())
    # cell types cycle over the three classes
    types = {r["id"]: r["cell_type"] for r in train_rows}
    assert sorted(types.values()).count("shsy5y") == COUNTS["train"] // 3


def test_sample_submission(synth_root):
    text = (synth_root / "sample_submission.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == "id,predicted"
    test_ids = {p.stem for p in (synth_root / "test").glob("*.png")}
    assert {line.split(",")[0] for line in lines[1:]} == test_ids
    assert all(line.endswith(",") for line in lines[1:])


def test_livecell_coco_files(synth_root):
    lc = synth_root / "LIVECell_dataset_2021"
    seen_images = 0
    for split in ("train", "val", "test"):
        json_path, image_dir = livecell_split_files(lc, split)
        data = json.loads(json_path.read_text())
        assert data["categories"] == [{"id": 1, "name": "cell", "supercategory": "cell"}]
        assert isinstance(data["annotations"], dict)
        assert len(data["images"]) >= 1, f"split {split} is empty"
        seen_images += len(data["images"])
        image_ids = set()
        for info in data["images"]:
            assert set(info) == {"id", "file_name", "width", "height"}
            assert (info["width"], info["height"]) == (W, H)
            assert (image_dir / info["file_name"]).is_file()
            prefix = info["file_name"].split("_Phase_")[0]
            assert prefix in LIVECELL_STYLES and prefix.lower() in LIVECELL_CLASSES
            image_ids.add(info["id"])
        for key, ann in data["annotations"].items():
            assert key == str(ann["id"])
            assert ann["image_id"] in image_ids and ann["category_id"] == 1 and ann["iscrowd"] == 0
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= W and y + h <= H
            assert ann["area"] > 0
            for poly in ann["segmentation"]:
                assert len(poly) >= 6 and len(poly) % 2 == 0
    assert seen_images == COUNTS["livecell"]


# ----------------------------------------------------------------------- the project's readers


def test_read_back_with_the_competition_readers(synth_root, train_rows):
    records = read_train_csv(synth_root / "train.csv")
    assert len(records) == COUNTS["train"]
    n_rows = {}
    for row in train_rows:
        n_rows[row["id"]] = n_rows.get(row["id"], 0) + 1
    for rec in records:
        assert rec.path.is_file() and (rec.height, rec.width) == (H, W)
        assert len(rec) == n_rows[rec.image_id]
        boxes = rec.boxes
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= W).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= H).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    for folder, n in (("test", COUNTS["test"]), ("train_semi_supervised", COUNTS["unlabeled"])):
        listed = list_images(synth_root / folder)
        assert len(listed) == n
        assert all((r.height, r.width) == (H, W) for r in listed)


def test_read_back_with_the_livecell_reader(synth_root):
    lc = synth_root / "LIVECell_dataset_2021"
    total = 0
    for split in ("train", "val", "test"):
        records = read_livecell_coco(*livecell_split_files(lc, split))
        for rec in records:
            assert rec.cell_type in LIVECELL_CLASSES and len(rec) > 0
            masks = rec.masks()
            assert masks.shape == (len(rec), H, W) and masks.reshape(len(rec), -1).any(1).all()
            # boxes agree with the rasterised polygons (pixel-edge xyxy)
            ys, xs = np.nonzero(masks[0])
            np.testing.assert_allclose(rec.boxes[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        total += len(records)
    assert total == COUNTS["livecell"]


def test_polygons_rasterise_back_to_the_masks():
    sample = synth_image("SkBr3", 96, 128, rng=3)
    assert len(sample) > 3
    ious = []
    for inst in sample.instances:
        truth = inst.full(96, 128)
        back = polygons_to_mask(inst.polygons(), 96, 128)
        ious.append((truth & back).sum() / (truth | back).sum())
    assert np.mean(ious) > 0.99 and min(ious) > 0.9


def test_instance_rle_matches_full_mask_encoding():
    sample = synth_image("astro", 120, 150, rng=5)
    masks = sample.masks()
    assert masks.shape == (len(sample), 120, 150)
    for inst, mask, rle in zip(sample.instances, masks, sample.rles(), strict=True):
        assert rle == rle_encode(mask)
        assert inst.area == mask.sum() > 0
        ys, xs = np.nonzero(mask)
        np.testing.assert_array_equal(inst.box(), [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


# ------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_other_bytes(synth_root, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert _synth(again, seed=0) == 0
    assert _synth(other, seed=1) == 0
    files = sorted(p.relative_to(synth_root) for p in synth_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (synth_root / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert (other / "train.csv").read_bytes() != (synth_root / "train.csv").read_bytes()
    a = sorted((synth_root / "train").iterdir())[0].read_bytes()
    b = sorted((other / "train").iterdir())[0].read_bytes()
    assert a != b


def test_counts_do_not_shift_other_splits(tmp_path):
    """Each image has its own random stream: more test images leave train images unchanged."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_dataset(a, 2, 0, 1, 0, seed=4, size=(64, 80))
    write_dataset(b, 2, 0, 3, 0, seed=4, size=(64, 80))
    assert (a / "train.csv").read_bytes() == (b / "train.csv").read_bytes()


def test_rerun_replaces_an_earlier_synthetic_dataset(tmp_path):
    write_dataset(tmp_path, 3, 2, 2, 3, seed=0, size=(64, 80))
    write_dataset(tmp_path, 1, 0, 1, 3, seed=1, size=(64, 80))
    assert len(list((tmp_path / "train").iterdir())) == 1
    assert list((tmp_path / "train_semi_supervised").iterdir()) == []
    assert len(list((tmp_path / "test").iterdir())) == 1
    assert len(read_train_csv(tmp_path / "train.csv")) == 1


def test_refuses_a_folder_holding_other_data(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    real = tmp_path / "train" / "0030fd0e6378.png"
    real.write_bytes(b"not ours")
    assert main(["synth", str(tmp_path), "--size", "64x64"]) == 2
    assert "not written by `cellmask synth`" in capsys.readouterr().err
    assert real.read_bytes() == b"not ours"


# ------------------------------------------------------------------------------ plausibility


def _per_class(records) -> dict[str, dict[str, list]]:
    out: dict[str, dict[str, list]] = {t: {"counts": [], "areas": []} for t in CELL_STYLES}
    for rec in records:
        masks = rec.masks()
        out[rec.cell_type]["counts"].append(len(rec))
        out[rec.cell_type]["areas"].extend(masks.reshape(len(rec), -1).sum(1).tolist())
    return out


def test_per_class_plausibility(tmp_path):
    """At the competition's size, counts and sizes per class are in the real data's ballpark."""
    write_dataset(tmp_path, 3, 0, 0, 0, seed=2)
    stats = _per_class(read_train_csv(tmp_path / "train.csv"))
    sh, co, ast = stats["shsy5y"], stats["cort"], stats["astro"]
    # real fixtures: shsy5y 395/496 cells, median area ~260; cort 36/42, ~170-310; astro 90/108, ~570-680
    assert min(sh["counts"]) > max(ast["counts"]) > max(co["counts"])
    assert 150 <= sh["counts"][0] <= 700
    assert 10 <= co["counts"][0] <= 90
    assert 30 <= ast["counts"][0] <= 200
    med = {t: float(np.median(s["areas"])) for t, s in stats.items()}
    assert med["astro"] > 1.5 * med["shsy5y"]
    assert 150 < med["shsy5y"] < 450
    assert 100 < med["cort"] < 400 and max(co["areas"]) < 800, "cort masks are small somata only"
    assert 400 < med["astro"] < 1500


def test_some_truth_masks_overlap(synth_root):
    records = read_train_csv(synth_root / "train.csv")
    overlapping = [int((rec.masks().sum(0) > 1).sum()) for rec in records if len(rec) > 1]
    assert sum(overlapping) > 0
    # ... but only a little: far fewer overlapping pixels than annotated pixels
    covered = sum(int(rec.masks().any(0).sum()) for rec in records)
    assert sum(overlapping) < 0.1 * covered


def test_every_style_renders_something():
    for name in [*CELL_STYLES, *LIVECELL_STYLES]:
        sample = synth_image(name, 96, 96, rng=0)
        assert sample.image.shape == (96, 96) and sample.image.dtype == np.uint8
        assert all(inst.area > 0 for inst in sample.instances)


# -------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("bad", ["520", "520x", "axb", "520x704x3", "-5x10", "10x10"])
def test_bad_size_exits_2_with_a_clear_message(tmp_path, capsys, bad):
    assert main(["synth", str(tmp_path / "out"), f"--size={bad}"]) == 2
    err = capsys.readouterr().err
    assert "--size" in err and "cellmask synth: error:" in err


def test_negative_count_is_an_error(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "out"), "--train", "-1", "--size", "64x64"]) == 2
    assert "--train" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("520x704") == (520, 704)
    assert parse_size("64X96") == (64, 96)
    with pytest.raises(DataError, match="HxW"):
        parse_size("big")


def test_unknown_cell_type():
    with pytest.raises(ValueError, match="unknown cell type"):
        synth_image("neuron")
