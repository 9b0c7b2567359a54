"""Checking ``submission.csv`` before an upload: ``cellmask check-submission``.

One row per predicted instance, ``predicted`` a row-major 1-indexed RLE (see
:mod:`cellmask.data.rle`); an image without any instance still gets one row whose
``predicted`` is empty.
"""

from __future__ import annotations

import argparse
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellmask.data.rle import runs_to_indices
from cellmask.submission.format import SUBMISSION_COLUMNS, _check_rle_syntax

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
"""Files of the images folder that :func:`check_submission` treats as images (id = file stem)."""


@dataclass
class SubmissionReport:
    """What :func:`inspect_submission` found.

    Attributes:
        path: the submission checked.
        n_rows: data rows read (header, blank and unparseable rows not counted).
        n_images: distinct ids among those rows.
        problems: one human-readable line per problem; empty when the file is valid.
    """

    path: Path
    n_rows: int = 0
    n_images: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _image_sizes(images_dir: Path, problems: list[str]) -> tuple[dict[str, Path], dict[str, tuple[int, int]]]:
    """Image files of a folder by id, and ``(height, width)`` of those that read.

    Only headers are decoded (``PIL.Image.open`` + ``verify``, no pixel data). An unreadable
    file is a problem; its id still counts as an image, but its RLEs cannot be bounds-checked.
    """
    from PIL import Image

    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: no such images folder")
    files: dict[str, Path] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for file in sorted(images_dir.iterdir()):
        if not file.is_file() or file.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if file.stem in files:
            problems.append(f"two images for id {file.stem}: {files[file.stem].name} and {file.name}")
            continue
        files[file.stem] = file
        try:
            with Image.open(file) as im:
                width, height = im.size
                im.verify()
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on bad files
            problems.append(f"unreadable image {file}: {type(exc).__name__}: {exc}")
            continue
        sizes[file.stem] = (height, width)
    if not files:
        problems.append(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir}")
    return files, sizes


def _read_rows(path: Path, report: SubmissionReport) -> dict[str, list[tuple[int, str]]]:
    """Rows of a submission by id: ``{id: [(line, rle), ...]}``; header/row problems go to ``report``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        report.problems.append(f"{path}: not UTF-8 text ({exc})")
        return {}
    if text.startswith("\ufeff"):
        report.problems.append(f"{path}: starts with a UTF-8 byte-order mark")
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        report.problems.append(f"{path}: empty file (expected the header {','.join(SUBMISSION_COLUMNS)})")
        return {}
    header = [c.strip() for c in header]
    dup_cols = sorted({c for c in header if header.count(c) > 1})
    if dup_cols:
        report.problems.append(f"line 1: duplicate column(s) {', '.join(dup_cols)} in header {header}")
    missing = [c for c in SUBMISSION_COLUMNS if c not in header]
    if missing:
        report.problems.append(f"line 1: missing column(s) {', '.join(missing)} (header: {header})")
        return {}
    extra = [c for c in header if c not in SUBMISSION_COLUMNS]
    if extra:
        report.problems.append(
            f"line 1: unexpected column(s) {', '.join(extra)} "
            f"(expected exactly {','.join(SUBMISSION_COLUMNS)})"
        )
    id_col, pred_col = header.index("id"), header.index("predicted")

    rows: dict[str, list[tuple[int, str]]] = {}
    for row in reader:
        line = reader.line_num
        if not row:
            continue  # blank line
        if len(row) != len(header):
            report.problems.append(f"line {line}: {len(row)} field(s), the header has {len(header)}")
            continue
        cells = [c.strip() for c in row]
        if cells == header:
            report.problems.append(f"line {line}: repeated header row")
            continue
        image_id, rle = cells[id_col], cells[pred_col]
        if not image_id:
            report.problems.append(f"line {line}: empty id")
            continue
        rows.setdefault(image_id, []).append((line, rle))
        report.n_rows += 1
    report.n_images = len(rows)
    return rows


def _is_zero_area(rle: str) -> bool:
    """True for a well-formed pair list whose lengths are all 0 (e.g. ``"1 0"``)."""
    tokens = rle.split()
    if not tokens or len(tokens) % 2 or not all(t.lstrip("-").isdigit() for t in tokens):
        return False
    return all(int(t) == 0 for t in tokens[1::2])


def _check_image_rows(
    image_id: str, rows: list[tuple[int, str]], size: tuple[int, int] | None, problems: list[str]
) -> None:
    """RLE problems of one image's rows: malformed, out of bounds, empty, overlapping."""
    lines: list[int] = []
    runs: list[tuple[np.ndarray, np.ndarray]] = []
    for line, rle in rows:
        if not rle:
            if len(rows) > 1:
                problems.append(
                    f"id {image_id}, line {line}: empty predicted, but the image has other rows "
                    "(an empty row is only for an image without instances)"
                )
            continue
        try:
            starts, lengths = _check_rle_syntax(rle)
        except ValueError as exc:
            if _is_zero_area(rle):
                problems.append(f"id {image_id}, line {line}: empty mask (zero-area RLE {rle!r})")
            else:
                problems.append(f"id {image_id}, line {line}: malformed RLE: {exc}")
            continue
        if size is not None:
            height, width = size
            ends = starts + lengths
            beyond = ends > height * width
            if beyond.any():
                i = int(np.argmax(beyond))
                problems.append(
                    f"id {image_id}, line {line}: out-of-bounds RLE: run {starts[i] + 1}+{lengths[i]} "
                    f"(pair {i}) ends beyond the image ({height}x{width} = {height * width} pixels)"
                )
                continue
        lines.append(line)
        runs.append((starts, lengths))

    if len(runs) < 2:
        return
    # Every claimed pixel once per instance; a pixel seen twice is an overlap.
    pixels = np.concatenate([runs_to_indices(s, n) for s, n in runs])
    owners = np.repeat(np.array(lines, dtype=np.int64), [int(n.sum()) for _, n in runs])
    counts = np.bincount(pixels)
    shared = counts > 1
    n_shared = int(np.count_nonzero(shared))
    if n_shared:
        involved = np.unique(owners[shared[pixels]]).tolist()
        shown = ", ".join(map(str, involved[:10])) + (" ..." if len(involved) > 10 else "")
        problems.append(
            f"id {image_id}: {n_shared} pixel(s) claimed by more than one instance "
            f"({len(involved)} rows overlap: lines {shown})"
        )


def inspect_submission(path: str | Path, images_dir: str | Path) -> SubmissionReport:
    """Validate a submission against the folder of images it is for.

    Reports: header problems (missing, duplicate or unexpected columns, a repeated header row),
    rows with the wrong number of fields or an empty id, ids without an image (unknown) and
    images without a row (missing), unreadable image files, malformed RLE, runs beyond the
    image (size read from each image's header), empty masks (an empty row next to other rows
    of the same image, or a zero-area RLE) and pixels claimed by two instances of one image.

    Args:
        path: the ``submission.csv``.
        images_dir: folder of the images (``<id>.png`` etc., see :data:`IMAGE_EXTENSIONS`).

    Returns:
        a :class:`SubmissionReport`; ``report.problems`` holds one line per problem, naming the
        id and the CSV line where there is one.

    Raises:
        FileNotFoundError: ``path`` or ``images_dir`` does not exist.
    """
    path, images_dir = Path(path), Path(images_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such submission file")
    report = SubmissionReport(path=path)
    files, sizes = _image_sizes(images_dir, report.problems)
    rows = _read_rows(path, report)
    for image_id, image_rows in rows.items():
        if image_id not in files:
            report.problems.append(
                f"unknown id {image_id}: {len(image_rows)} row(s) from line {image_rows[0][0]}, "
                f"but no image {image_id}.* in {images_dir}"
            )
        _check_image_rows(image_id, image_rows, sizes.get(image_id), report.problems)
    # With no readable row at all because the header is broken, "every image is missing" is noise.
    if rows or not report.problems:
        for image_id, file in files.items():
            if image_id not in rows:
                report.problems.append(
                    f"missing id {image_id}: image {file.name} has no row (an image without "
                    "instances still needs one row with an empty predicted)"
                )
    return report


def check_submission(path: str | Path, images_dir: str | Path) -> list[str]:
    """The problems :func:`inspect_submission` finds, one line each (``[]`` when valid)."""
    return inspect_submission(path, images_dir).problems


def cli_check_submission(args: argparse.Namespace) -> int:
    """``cellmask check-submission FILE --images DIR``: print ``OK: ...`` or one line per problem.

    Returns:
        0 when the submission is valid, 1 otherwise.
    """
    report = inspect_submission(args.file, args.images)
    if report.ok:
        print(f"OK: {report.n_rows} rows, {report.n_images} images")
        return 0
    for problem in report.problems:
        print(problem)
    return 1
