"""The submission format: columns ``id,predicted``, one row per instance, ``predicted`` a
row-major 1-indexed RLE (:mod:`cellmask.data.rle`); an image without any instance gets one row
whose ``predicted`` is empty. Reading it, and the RLE syntax check that needs no image size."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from cellmask.data.rle import rle_to_runs
from cellmask.errors import DataError

SUBMISSION_COLUMNS = ("id", "predicted")


def read_submission(path: str | Path) -> dict[str, list[str]]:
    """Read a submission into ``{image_id: [rle, ...]}`` (ids in file order).

    An image whose only row has an empty ``predicted`` maps to ``[]``. RLE strings are not
    validated here (that needs the image size); the metric and the checker do it.

    Raises:
        DataError: the file lacks the ``id``/``predicted`` columns, or a row has an empty id;
            the message names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such submission file")
    out: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:  # a byte-order mark is not part of "id"
        reader = csv.DictReader(f)
        if reader.fieldnames:
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
        missing = [c for c in SUBMISSION_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header: {reader.fieldnames})")
        for row in reader:
            image_id = (row["id"] or "").strip()
            if not image_id:
                raise DataError(f"{path}, line {reader.line_num}: empty id")
            rles = out.setdefault(image_id, [])
            rle = (row["predicted"] or "").strip()
            if rle:
                rles.append(rle)
    return out


_UNBOUNDED = 2**62  # an image "size" no run can exceed: bounds are checked separately


def _check_rle_syntax(rle: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse an RLE without knowing the image size (every check but the upper bound)."""
    return rle_to_runs(rle, 1, _UNBOUNDED)
