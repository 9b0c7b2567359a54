"""Scoring CSV files: the truth reader, ``score_files`` and the location of a bad row.

Plain, valid files go through the bytes-level scan of :mod:`cellmask.metric.scan`; anything
else (and every error) through the general readers here and
:func:`cellmask.submission.read_submission`, which name the file, line and image id.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from cellmask.errors import DataError
from cellmask.metric.scan import score_plain_files
from cellmask.metric.scoring import ScoreReport, TruthImage, score_submission

__all__ = ["TRUTH_COLUMNS", "read_truth_csv", "score_files"]

TRUTH_COLUMNS = ("id", "annotation", "width", "height")
"""Columns a truth CSV (the competition's ``train.csv``) must have; ``cell_type`` is optional."""


def read_truth_csv(path: str | Path) -> dict[str, TruthImage]:
    """Read a competition-style truth CSV (``train.csv``) into ``{image_id: TruthImage}``.

    Rows are grouped by ``id`` (first-appearance order); a row with an empty ``annotation``
    marks an image with no truth instance. Only ``id``, ``annotation``, ``width``, ``height``
    and the optional ``cell_type`` are read; RLEs are validated when scored. (For scoring
    files, :func:`score_files` has a faster reader; this one is the general, exact one.)

    Raises:
        FileNotFoundError: no such file.
        DataError: a missing column, a short row, an empty id, a non-integer or non-positive
            size, or a size or cell type that differs between rows of one id; the message
            names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such truth file")
    out: dict[str, TruthImage] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in TRUTH_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header: {header})")
        i_id, i_ann, i_w, i_h = (header.index(c) for c in TRUTH_COLUMNS)
        i_ct = header.index("cell_type") if "cell_type" in header else None
        need = max(i_id, i_ann, i_w, i_h, -1 if i_ct is None else i_ct) + 1
        for row in reader:
            if not row:
                continue
            where = f"{path}, line {reader.line_num}"
            if len(row) < need:
                raise DataError(f"{where}: {len(row)} field(s), the header has {len(header)}")
            image_id = row[i_id].strip()
            if not image_id:
                raise DataError(f"{where}: empty id")
            cell_type = (row[i_ct].strip() or None) if i_ct is not None else None
            img = out.get(image_id)
            if img is None:
                size = _parse_size(row[i_h], row[i_w], where, image_id)
                img = out[image_id] = TruthImage(size[0], size[1], cell_type, [])
            elif (_to_int(row[i_h]), _to_int(row[i_w]), cell_type) != (img.height, img.width, img.cell_type):
                raise DataError(
                    f"{where}: id {image_id!r}: height/width/cell_type {row[i_h]}/{row[i_w]}/{cell_type} "
                    f"differ from the id's first row ({img.height}/{img.width}/{img.cell_type})"
                )
            rle = row[i_ann].strip()
            if rle:
                img.rles.append(rle)
    return out


def _to_int(text: str) -> int | None:
    """``int(text)`` (surrounding spaces and leading zeros allowed), or ``None``."""
    try:
        return int(text)
    except ValueError:
        return None


def _parse_size(height: str, width: str, where: str, image_id: str) -> tuple[int, int]:
    h, w = _to_int(height), _to_int(width)
    if h is None or w is None or h <= 0 or w <= 0:
        raise DataError(
            f"{where}: id {image_id!r}: height/width {height!r}/{width!r} are not positive integers"
        )
    return h, w


def _line_of(path: Path, image_id: str, predicate: Any = None) -> int | None:
    """Line number of the first row of ``image_id`` for which ``predicate(row)`` holds (any
    row when ``None``). Only used to word an error, so a second pass over the file is fine."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        i_id = [h.strip() for h in next(reader)].index("id")
        for row in reader:
            if len(row) > i_id and row[i_id].strip() == image_id and (predicate is None or predicate(row)):
                return reader.line_num
    return None


def _find_line(path: Path, column: str, image_id: str, index: int | None) -> int | None:
    """Line of the ``index``-th non-empty ``column`` value of ``image_id`` (its first row when
    ``index`` is None)."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        i_col = [h.strip() for h in next(csv.reader(f))].index(column)
    if index is None:
        return _line_of(path, image_id)
    seen = [-1]

    def is_it(row: list[str]) -> bool:
        if row[i_col].strip():
            seen[0] += 1
        return seen[0] == index

    return _line_of(path, image_id, is_it)


def score_files(truth_csv: str | Path, pred_csv: str | Path) -> ScoreReport:
    """Score a ``submission.csv`` against a competition-style truth CSV.

    Plain, valid files (what Kaggle and :mod:`cellmask.submission` write) go through a
    bytes-level scan (:func:`cellmask.metric.scan.score_plain_files`); anything else -- quoting, blank lines, odd
    whitespace, and every error -- through :func:`read_truth_csv`,
    :func:`cellmask.submission.read_submission` and :func:`score_submission`, which give the
    same report, or an error message naming the file, line and image id.

    Args:
        truth_csv: ``id,annotation,width,height[,cell_type,...]`` (the competition's
            ``train.csv`` format); an image whose only row has an empty annotation has no truth.
        pred_csv: ``id,predicted``; truth images it lacks are scored with no prediction.

    Returns:
        A :class:`ScoreReport`.

    Raises:
        FileNotFoundError: a file is missing.
        DataError: bad CSV, an image id unknown to the truth, or a malformed RLE; the message
            names the file, the line and the image id.
    """
    truth_csv, pred_csv = Path(truth_csv), Path(pred_csv)
    fast = score_plain_files(truth_csv, pred_csv)
    if fast is not None:
        return fast
    from cellmask.submission import read_submission

    truth = read_truth_csv(truth_csv)
    if not truth:
        raise DataError(f"{truth_csv}: no rows")
    pred = read_submission(pred_csv)
    try:
        return score_submission(truth, pred)
    except DataError as exc:
        side = getattr(exc, "side", None)
        image_id = getattr(exc, "image_id", None)
        if side is None or image_id is None:
            raise
        path, column = (pred_csv, "predicted") if side == "pred" else (truth_csv, "annotation")
        line = _find_line(path, column, image_id, exc.index)
        where = f"{path}, line {line}" if line is not None else str(path)
        if exc.index is None:  # an unknown id
            raise DataError(f"{where}: image id {image_id!r} is not in the truth file {truth_csv}") from None
        raise DataError(f"{where}: {exc}") from None
