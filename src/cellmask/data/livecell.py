"""Reader for LIVECell's COCO annotation files (``livecell_coco_{train,val,test}.json``).

LIVECell ships one COCO category (``cell``); the cell type is the image file name's prefix
(``A172_Phase_A7_1_00d00h00m_1.tif`` is an A172 image). For pretraining each of the eight
cell types gets its own label (:data:`LIVECELL_CLASSES`). The ``annotations`` field is a dict
keyed by annotation id in LIVECell's files; a plain COCO list is accepted too.

Per the paper, LIVECell's train and test splits are both used for training and val for
validation: see :func:`livecell_split_files`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from cellmask.data.records import ImageRecord
from cellmask.errors import DataError

LIVECELL_CLASSES: tuple[str, ...] = ("a172", "bt474", "bv2", "huh7", "mcf7", "shsy5y", "skbr3", "skov3")
"""LIVECell's eight cell types; label ``i + 1`` is ``LIVECELL_CLASSES[i]``."""

LIVECELL_CLASS_TO_LABEL: dict[str, int] = {name: i + 1 for i, name in enumerate(LIVECELL_CLASSES)}

SPLITS = ("train", "val", "test")


def livecell_cell_type(file_name: str) -> str:
    """The lower-case cell type of a LIVECell file name (the part before ``_Phase``)."""
    return Path(file_name).name.split("_", 1)[0].lower()


def livecell_split_files(livecell_root: str | Path, split: str) -> tuple[Path, Path]:
    """``(annotation json, image folder)`` of one split under ``LIVECell_dataset_2021/``.

    Train and val images share ``livecell_train_val_images``; test has ``livecell_test_images``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown LIVECell split {split!r}; expected one of {SPLITS}")
    root = Path(livecell_root)
    folder = "livecell_test_images" if split == "test" else "livecell_train_val_images"
    return (
        root / "annotations" / "LIVECell" / f"livecell_coco_{split}.json",
        root / "images" / folder,
    )


def read_livecell_coco(json_path: str | Path, image_root: str | Path) -> list[ImageRecord]:
    """Read one LIVECell COCO file into records (image order of the file).

    Args:
        json_path: ``livecell_coco_<split>.json``.
        image_root: folder holding the split's images; searched recursively, since some copies
            of LIVECell keep one sub-folder per cell type.

    Returns:
        records with ``boxes`` float32 ``[N, 4]`` xyxy from the COCO ``bbox`` (x, y, w, h),
        ``labels`` int64 ``[N]`` from :data:`LIVECELL_CLASS_TO_LABEL`, polygon segmentations
        (``seg_format="polygon"``), ``sample_id`` the well (file name without time and crop).
        Annotations with a degenerate box (w or h <= 0) are skipped.

    Raises:
        FileNotFoundError: no JSON file, or an image listed in it is missing under ``image_root``.
        DataError: invalid JSON, missing keys, an unknown cell type, or a malformed polygon;
            the message names the file and the image or annotation id.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: no such file")
    try:
        data = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{json_path}: invalid JSON ({exc})") from None
    for key in ("images", "annotations"):
        if key not in data:
            raise DataError(f"{json_path}: no {key!r} key")
    annotations = data["annotations"]
    if isinstance(annotations, dict):
        annotations = list(annotations.values())
    files = {p.name: p for p in image_root.rglob("*") if p.is_file()} if image_root.is_dir() else {}

    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in annotations:
        by_image[ann["image_id"]].append(ann)

    records = []
    for info in data["images"]:
        try:
            image_id, file_name = info["id"], info["file_name"]
            height, width = int(info["height"]), int(info["width"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{json_path}: image entry {info!r} lacks id/file_name/height/width ({exc})"
            ) from None
        cell_type = livecell_cell_type(file_name)
        if cell_type not in LIVECELL_CLASS_TO_LABEL:
            raise DataError(
                f"{json_path}: image {image_id} ({file_name}): unknown cell type {cell_type!r}; "
                f"expected one of {', '.join(LIVECELL_CLASSES)}"
            )
        path = files.get(Path(file_name).name)
        if path is None:
            raise FileNotFoundError(
                f"{json_path}: image {image_id} ({file_name}) not found under {image_root}"
            )
        boxes, polygons = [], []
        for ann in by_image.get(image_id, []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 0 or h <= 0:
                continue
            segmentation = ann.get("segmentation")
            if (
                not isinstance(segmentation, list)
                or not segmentation
                or any(not isinstance(p, list) or len(p) < 6 or len(p) % 2 for p in segmentation)
            ):
                raise DataError(
                    f"{json_path}: annotation {ann.get('id')} of image {image_id}: segmentation must be a "
                    "list of polygons [x0, y0, x1, y1, ...] with at least 3 points"
                )
            boxes.append((x, y, x + w, y + h))
            polygons.append(segmentation)
        stem = Path(file_name).stem
        records.append(
            ImageRecord(
                image_id=stem,
                path=path,
                height=height,
                width=width,
                cell_type=cell_type,
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                labels=np.full(len(boxes), LIVECELL_CLASS_TO_LABEL[cell_type], dtype=np.int64),
                segmentations=polygons,
                seg_format="polygon",
                sample_id=stem.rsplit("_", 2)[0],
            )
        )
    return records


def read_livecell(
    livecell_root: str | Path, splits: tuple[str, ...] = ("train", "test")
) -> list[ImageRecord]:
    """Records of several LIVECell splits (the paper trains on train + test, validates on val)."""
    records: list[ImageRecord] = []
    for split in splits:
        records.extend(read_livecell_coco(*livecell_split_files(livecell_root, split)))
    return records
