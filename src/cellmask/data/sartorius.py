"""Readers for the competition's files: ``train.csv``, ``train/``, ``train_semi_supervised/``, ``test/``.

``train.csv`` has one row per instance with the columns :data:`TRAIN_COLUMNS`; the reader
groups rows by image id into :class:`~cellmask.data.records.ImageRecord` (boxes computed from
the RLE runs without decoding masks; masks decoded lazily on demand).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from cellmask.data.classes import CLASS_TO_LABEL
from cellmask.data.images import image_size
from cellmask.data.records import ImageRecord
from cellmask.data.rle import rle_to_runs, runs_box
from cellmask.errors import DataError

TRAIN_COLUMNS = (
    "id",
    "annotation",
    "width",
    "height",
    "cell_type",
    "plate_time",
    "sample_date",
    "sample_id",
    "elapsed_timedelta",
)
META_COLUMNS = ("plate_time", "sample_date", "elapsed_timedelta")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def read_train_csv(csv_path: str | Path, image_dir: str | Path | None = None) -> list[ImageRecord]:
    """Read a competition ``train.csv`` into one record per image (ids in file order).

    Args:
        csv_path: the CSV (``id,annotation,width,height,cell_type,...``).
        image_dir: where ``<id>.png`` lives; defaults to ``train/`` beside the CSV. Images are
            not opened here.

    Returns:
        records with ``boxes`` float32 ``[N, 4]`` xyxy (pixel edges), ``labels`` int64 ``[N]``
        (1 shsy5y, 2 cort, 3 astro), ``segmentations`` the RLE strings, ``seg_format="rle"``.
        A row with an empty ``annotation`` contributes an image without instances.

    Raises:
        FileNotFoundError: no CSV.
        DataError: a missing column, a non-integer size, an unknown cell type, a malformed or
            out-of-image RLE, or rows of one id that disagree on size or cell type. The message
            names the file, the line and the id.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: no such file")
    image_dir = Path(image_dir) if image_dir is not None else csv_path.parent / "train"
    groups: dict[str, _ImageRows] = {}
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [
            c
            for c in ("id", "annotation", "width", "height", "cell_type")
            if c not in (reader.fieldnames or [])
        ]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        for row in reader:
            where = f"{csv_path}, line {reader.line_num}"
            image_id = (row["id"] or "").strip()
            if not image_id:
                raise DataError(f"{where}: empty id")
            try:
                width, height = int(row["width"]), int(row["height"])
            except (TypeError, ValueError):
                raise DataError(
                    f"{where} (id {image_id}): width/height {row['width']!r}/{row['height']!r} are not integers"
                ) from None
            cell_type = (row["cell_type"] or "").strip()
            if cell_type not in CLASS_TO_LABEL:
                raise DataError(
                    f"{where} (id {image_id}): unknown cell_type {cell_type!r}; expected one of "
                    f"{', '.join(CLASS_TO_LABEL)}"
                )
            group = groups.get(image_id)
            if group is None:
                group = groups[image_id] = _ImageRows(image_id, height, width, cell_type, row)
            elif (height, width, cell_type) != (group.height, group.width, group.cell_type):
                raise DataError(
                    f"{where} (id {image_id}): size {height}x{width}/{cell_type} differs from the "
                    f"id's first row ({group.height}x{group.width}/{group.cell_type})"
                )
            annotation = (row["annotation"] or "").strip()
            if not annotation:
                continue
            try:
                starts, lengths = rle_to_runs(annotation, height, width)
            except ValueError as exc:
                raise DataError(f"{where} (id {image_id}): malformed annotation: {exc}") from None
            if len(starts) == 0:
                continue
            group.rles.append(annotation)
            group.boxes.append(runs_box(starts, lengths, width))
    return [g.to_record(image_dir) for g in groups.values()]


class _ImageRows:
    """Rows of one image id, accumulated while reading (internal)."""

    def __init__(self, image_id: str, height: int, width: int, cell_type: str, first_row: dict) -> None:
        self.image_id, self.height, self.width, self.cell_type = image_id, height, width, cell_type
        self.sample_id = (first_row.get("sample_id") or "").strip()
        self.meta = {k: first_row[k] for k in META_COLUMNS if first_row.get(k) is not None}
        self.rles: list[str] = []
        self.boxes: list[np.ndarray] = []

    def to_record(self, image_dir: Path) -> ImageRecord:
        n = len(self.rles)
        return ImageRecord(
            image_id=self.image_id,
            path=image_dir / f"{self.image_id}.png",
            height=self.height,
            width=self.width,
            cell_type=self.cell_type,
            boxes=np.stack(self.boxes).astype(np.float32) if n else np.zeros((0, 4), np.float32),
            labels=np.full(n, CLASS_TO_LABEL[self.cell_type], dtype=np.int64),
            segmentations=self.rles,
            seg_format="rle",
            sample_id=self.sample_id or self.image_id,
            meta=self.meta,
        )


def list_images(image_dir: str | Path, read_sizes: bool = True) -> list[ImageRecord]:
    """List the images of a folder (``test/``, ``train_semi_supervised/``) as records without instances.

    Args:
        image_dir: folder of images (``.png``, ``.tif``, ...); the id is the file stem.
        read_sizes: read each image's size from its header (cheap); otherwise the competition
            size 520x704 is assumed.

    Returns:
        records sorted by id, ``cell_type=None``.

    Raises:
        FileNotFoundError: no such folder.
        DataError: an unreadable image header (names the file).
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: no such image folder")
    records = []
    for path in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        height, width = image_size(path) if read_sizes else (520, 704)
        records.append(
            ImageRecord(image_id=path.stem, path=path, height=height, width=width, sample_id=path.stem)
        )
    return records
