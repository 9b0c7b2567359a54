"""Readers: competition train.csv, image folders, LIVECell COCO files, folds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellmask.data.folds import make_folds, train_val_split
from cellmask.data.images import image_size, read_image
from cellmask.data.livecell import LIVECELL_CLASS_TO_LABEL, livecell_cell_type, read_livecell_coco
from cellmask.data.records import ImageRecord
from cellmask.data.rle import rle_encode
from cellmask.data.sartorius import TRAIN_COLUMNS, list_images, read_train_csv
from cellmask.errors import DataError

COUNTS = {
    "0030fd0e6378": ("shsy5y", 395),
    "0140b3c8f445": ("astro", 108),
    "01ae5a43a2ab": ("cort", 36),
    "026b3c2c4b32": ("cort", 42),
    "0a6ecc5fe78a": ("astro", 90),
    "de504eaa5349": ("shsy5y", 496),
}


def test_real_train_csv(real_records, real_root):
    assert {r.image_id: (r.cell_type, len(r)) for r in real_records} == COUNTS
    for rec in real_records:
        assert rec.path == real_root / "train" / f"{rec.image_id}.png" and rec.path.is_file()
        assert (rec.height, rec.width) == (520, 704)
        assert rec.boxes.dtype == np.float32 and rec.boxes.shape == (len(rec), 4)
        assert rec.labels.dtype == np.int64 and set(rec.labels) == {
            ("shsy5y", "cort", "astro").index(rec.cell_type) + 1
        }
        assert rec.sample_id and rec.meta["plate_time"]
        image = read_image(rec.path, (rec.height, rec.width))
        assert image.dtype == np.uint8 and image.shape == (520, 704)
    # boxes computed from runs equal boxes of the decoded masks (pixel-edge xyxy)
    rec = real_records[1]
    masks = rec.masks()
    for box, mask in zip(rec.boxes, masks, strict=True):
        ys, xs = np.nonzero(mask)
        np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert rec.rles() == rec.segmentations


def _write_csv(path: Path, rows: list[list[str]], header=TRAIN_COLUMNS) -> Path:
    path.write_text(",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def _row(image_id="abc", rle="1 3", w="8", h="4", cell="astro", sample="s1"):
    return [image_id, rle, w, h, cell, "09h00m00s", "2020-09-13", sample, "0 days 09:00:00"]


def test_empty_sample_id_falls_back_to_image_id(tmp_path):
    recs = read_train_csv(_write_csv(tmp_path / "t.csv", [_row(sample=""), _row("def", "5 2", sample="s9")]))
    assert [r.sample_id for r in recs] == ["abc", "s9"]


def test_empty_annotation_is_an_image_without_instances(tmp_path):
    recs = read_train_csv(_write_csv(tmp_path / "t.csv", [_row(rle="")]))
    assert len(recs) == 1 and len(recs[0]) == 0 and recs[0].boxes.shape == (0, 4)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([_row(cell="neuron")], r"line 2 \(id abc\): unknown cell_type 'neuron'"),
        ([_row(), _row(rle="1 2 3")], r"line 3 \(id abc\): malformed annotation: .*odd number"),
        ([_row(rle="30 5")], r"line 2 \(id abc\): malformed annotation: .*beyond the image"),
        ([_row(w="eight")], r"line 2 \(id abc\): width/height"),
        ([_row(), _row(w="16")], r"line 3 \(id abc\): size 4x16/astro differs"),
        ([_row(image_id="")], r"line 2: empty id"),
    ],
)
def test_train_csv_errors_name_line_and_id(tmp_path, rows, message):
    path = _write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError, match=message) as info:
        read_train_csv(path)
    assert str(path) in str(info.value)


def test_train_csv_missing_column(tmp_path):
    path = _write_csv(tmp_path / "bad.csv", [["abc", "1 3"]], header=("id", "annotation"))
    with pytest.raises(DataError, match="missing column"):
        read_train_csv(path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_train_csv(tmp_path / "nope.csv")


def test_list_images_real_test(real_root):
    recs = list_images(real_root / "test")
    assert [r.image_id for r in recs] == ["7ae19de7bc2a", "d48ec7815252", "d8bfd1dafdc4"]
    assert all((r.height, r.width) == (520, 704) and r.cell_type is None and len(r) == 0 for r in recs)


def test_corrupt_and_wrong_size_images(tmp_path, real_root):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png: cannot decode"):
        read_image(bad)
    with pytest.raises(DataError, match="broken.png: cannot read image header"):
        image_size(bad)
    with pytest.raises(DataError, match="broken.png"):
        list_images(tmp_path)
    with pytest.raises(DataError, match=r"520x704 \(HxW\) but 704x520 was expected"):
        read_image(real_root / "test" / "7ae19de7bc2a.png", (704, 520))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def _livecell_json(tmp_path: Path, real_root: Path, as_dict: bool = True) -> tuple[Path, Path]:
    """A tiny LIVECell-style COCO file over the real LIVECell fixture images."""
    image_root = tmp_path / "images"
    (image_root / "SkBr3").mkdir(parents=True)  # some copies keep per-type sub-folders
    names = sorted(p.name for p in (real_root / "livecell").glob("*.tif"))
    for name in names:
        sub = image_root / "SkBr3" if name.startswith("SkBr3") else image_root
        shutil.copy(real_root / "livecell" / name, sub / name)
    images = [{"id": i + 10, "file_name": n, "width": 704, "height": 520} for i, n in enumerate(names)]
    anns = [
        {
            "id": 1,
            "image_id": 10,
            "category_id": 1,
            "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]],
            "bbox": [10, 10, 20, 10],
            "area": 200.0,
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 11,
            "category_id": 1,
            "segmentation": [[100.5, 50, 140, 60, 120, 90]],
            "bbox": [100.5, 50, 39.5, 40],
            "area": 700.0,
            "iscrowd": 0,
        },
        {
            "id": 3,
            "image_id": 11,
            "category_id": 1,
            "segmentation": [[5, 5, 6, 5, 6, 6]],
            "bbox": [5, 5, 0, 1],
            "area": 0.0,
            "iscrowd": 0,
        },
    ]
    data = {
        "images": images,
        "annotations": {str(a["id"]): a for a in anns} if as_dict else anns,
        "categories": [{"id": 1, "name": "cell", "supercategory": "cell"}],
    }
    path = tmp_path / "livecell_coco_train.json"
    path.write_text(json.dumps(data))
    return path, image_root


@pytest.mark.parametrize("as_dict", [True, False])
def test_livecell_reader(tmp_path, real_root, as_dict):
    path, image_root = _livecell_json(tmp_path, real_root, as_dict)
    recs = read_livecell_coco(path, image_root)
    assert [r.cell_type for r in recs] == ["a172", "skbr3", "skbr3", "skbr3"]
    assert [len(r) for r in recs] == [1, 1, 0, 0]  # the degenerate box is skipped
    a172 = recs[0]
    assert a172.labels.tolist() == [LIVECELL_CLASS_TO_LABEL["a172"]]
    np.testing.assert_array_equal(a172.boxes, [[10, 10, 30, 20]])
    mask = a172.mask(0)
    assert mask.shape == (520, 704) and mask[15, 20] and not mask[5, 5]
    assert 180 <= mask.sum() <= 231  # the 20x10 rectangle, rasterised by pycocotools
    assert a172.sample_id == "A172_Phase_A7_1"
    image = read_image(recs[1].path, (recs[1].height, recs[1].width))
    assert image.shape == (520, 704)
    assert len(recs[1].rles()) == 1 and recs[1].rles()[0] == rle_encode(recs[1].mask(0))


def test_livecell_errors(tmp_path, real_root):
    path, image_root = _livecell_json(tmp_path, real_root)
    data = json.loads(path.read_text())
    data["images"][0]["file_name"] = "Neuron_Phase_A1_1_00d00h00m_1.tif"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="image 10 .*unknown cell type 'neuron'"):
        read_livecell_coco(path, image_root)
    data["images"][0]["file_name"] = "A172_Phase_Z9_1_00d00h00m_1.tif"
    path.write_text(json.dumps(data))
    with pytest.raises(FileNotFoundError, match="image 10 .*not found"):
        read_livecell_coco(path, image_root)
    path, image_root = _livecell_json(tmp_path / "b", real_root)
    data = json.loads(path.read_text())
    data["annotations"]["1"]["segmentation"] = [[1, 2, 3]]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="annotation 1 of image 10"):
        read_livecell_coco(path, image_root)
    path.write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        read_livecell_coco(path, image_root)


def test_livecell_cell_type():
    assert livecell_cell_type("SHSY5Y_Phase_B10_1_00d04h00m_1.tif") == "shsy5y"
    assert livecell_cell_type("/x/y/BV2_Phase_A4_2_03d00h00m_3.tif") == "bv2"


def _records(groups: dict[str, tuple[str, int]]) -> list[ImageRecord]:
    recs = []
    for sample, (cell_type, n) in groups.items():
        for k in range(n):
            recs.append(ImageRecord(f"{sample}-{k}", Path("x.png"), 4, 4, cell_type, sample_id=sample))
    return recs


def test_folds_grouped_and_stratified():
    rng = np.random.default_rng(3)
    groups = {f"{t}{g}": (t, int(rng.integers(1, 6))) for t in ("shsy5y", "cort", "astro") for g in range(12)}
    recs = _records(groups)
    folds = make_folds(recs, n_folds=4, seed=1)
    assert folds.min() == 0 and folds.max() == 3
    for sample in groups:  # no sample straddles two folds
        assert len({f for r, f in zip(recs, folds, strict=True) if r.sample_id == sample}) == 1
    for cell_type in ("shsy5y", "cort", "astro"):  # each type spread evenly (within one group's size)
        counts = np.bincount(
            [f for r, f in zip(recs, folds, strict=True) if r.cell_type == cell_type], minlength=4
        )
        assert counts.max() - counts.min() <= 5, (cell_type, counts)
    np.testing.assert_array_equal(folds, make_folds(recs, n_folds=4, seed=1))  # deterministic


def test_train_val_split_is_95_5_and_disjoint():
    recs = _records({f"s{i}": (("shsy5y", "cort", "astro")[i % 3], 1 + i % 2) for i in range(120)})
    train, val = train_val_split(recs, val_fraction=0.05)
    assert len(train) + len(val) == len(recs)
    assert 0.03 < len(val) / len(recs) < 0.07
    assert not {r.sample_id for r in train} & {r.sample_id for r in val}
    assert {r.cell_type for r in val} == {"shsy5y", "cort", "astro"}


def test_folds_on_real_records(real_records):
    folds = make_folds(real_records, n_folds=2)
    by_fold = [
        sorted(r.cell_type for r, f in zip(real_records, folds, strict=True) if f == k) for k in (0, 1)
    ]
    assert by_fold[0] == by_fold[1] == ["astro", "cort", "shsy5y"]
    with pytest.raises(ValueError, match="cannot fill"):
        make_folds(real_records, n_folds=7)


def test_three_way_split_is_disjoint_grouped_and_stratified():
    """Train / val (tuning) / held-out (scored): no image and no sample on two sides, every cell
    type in each scored fold, and the val/held-out sizes follow the fractions."""
    from cellmask.data.folds import split_records

    recs = _records({f"s{i}": (("shsy5y", "cort", "astro")[i % 3], 1 + i % 2) for i in range(120)})
    train, val, holdout = split_records(recs, val_fraction=0.1, holdout_fraction=0.1, seed=0)
    ids = [r.image_id for part in (train, val, holdout) for r in part]
    assert len(ids) == len(set(ids)) == len(recs)  # every image once, on one side
    sides = [{r.sample_id for r in part} for part in (train, val, holdout)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    for part in (val, holdout):
        assert 0.07 < len(part) / len(recs) < 0.13
        assert {r.cell_type for r in part} == {"shsy5y", "cort", "astro"}
    # no held-out fold: the two-way split exactly
    assert split_records(recs, 0.05, 0.0, 0)[:2] == train_val_split(recs, 0.05, 0)
    with pytest.raises(ValueError, match="whole number"):
        split_records(recs, 0.1, 0.15)


def test_competition_split_holds_images_out_of_training(real_root):
    """`cellmask train` never sees the held-out fold: load_split's train and val miss it."""
    from cellmask.training.split import competition_split, load_split

    cfg = {"train": {"val_fraction": 0.1, "holdout_fraction": 0.1, "seed": 0}}
    split = competition_split(cfg, real_root)  # 6 sample groups: raised to 1/6 each
    assert len(split.val) == len(split.holdout) == 1 and len(split.train) == 4
    train, val, _ = load_split(cfg, real_root, "sartorius")
    held = {r.image_id for r in split.holdout}
    assert held and not held & {r.image_id for r in train + val}
