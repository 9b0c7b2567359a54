"""Reading, writing and checking ``submission.csv`` (columns ``id,predicted``).

One row per predicted instance, ``predicted`` a row-major 1-indexed RLE (see
:mod:`cellmask.data.rle`); an image without any instance still gets one row whose
``predicted`` is empty.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellmask.data.rle import rle_encode, rle_to_runs, runs_to_indices, runs_to_rle
from cellmask.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SUBMISSION_COLUMNS",
    "SubmissionReport",
    "check_submission",
    "cli_check_submission",
    "inspect_submission",
    "masks_to_submission_rows",
    "read_submission",
    "window_to_rle",
    "window_to_runs",
    "write_submission",
]

SUBMISSION_COLUMNS = ("id", "predicted")
IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
"""Files of the images folder that :func:`check_submission` treats as images (id = file stem)."""


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


def masks_to_submission_rows(image_id: str, masks: np.ndarray) -> list[tuple[str, str]]:
    """Submission rows ``(id, rle)`` of one image's instance masks.

    Args:
        image_id: the image's id (file stem).
        masks: bool/uint8 ``[N, H, W]``; empty masks are skipped (they are not instances).

    Returns:
        one ``(image_id, rle)`` per non-empty mask, in input order; ``[(image_id, "")]`` when
        there is none, as the competition wants for an image without instances.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    rles = [rle_encode(m) for m in masks]
    rows = [(image_id, rle) for rle in rles if rle]
    return rows or [(image_id, "")]


def window_to_runs(window: np.ndarray, offset: Sequence[int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major runs of a mask stored as a window of an image ``width`` pixels wide.

    Args:
        window: bool ``[h, w]``, the mask's pixels from ``offset``.
        offset: ``(row, col)`` of the window's top-left pixel in the image.
        width: the image's width ``W``.

    Returns:
        0-indexed ``starts`` and ``lengths`` (int64 ``[R]``), exactly what
        :func:`cellmask.data.rle.mask_to_runs` gives for the whole ``[H, W]`` mask (runs that
        continue from one image row onto the next are joined), without building that mask.
    """
    win = np.asarray(window, dtype=bool)
    empty = np.zeros(0, dtype=np.int64)
    if win.ndim != 2 or win.size == 0:
        return empty, empty
    h, w = win.shape
    padded = np.zeros((h, w + 2), dtype=bool)  # a False column each side: no run crosses a row
    padded[:, 1:-1] = win
    flat = padded.ravel()
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if len(edges) == 0:
        return empty, empty
    first, stop = edges[0::2], edges[1::2]
    row = first // (w + 2)
    col = first - row * (w + 2) - 1
    starts = (int(offset[0]) + row) * int(width) + int(offset[1]) + col
    lengths = stop - first
    ends = starts + lengths
    new_run = np.ones(len(starts), dtype=bool)
    new_run[1:] = starts[1:] != ends[:-1]  # touching runs (a window spanning the full width)
    heads = np.flatnonzero(new_run)
    tails = np.r_[heads[1:] - 1, len(starts) - 1]
    return starts[heads].astype(np.int64), (ends[tails] - starts[heads]).astype(np.int64)


def window_to_rle(window: np.ndarray, offset: Sequence[int], width: int) -> str:
    """The submission RLE of a windowed mask (see :func:`window_to_runs`); ``""`` when empty."""
    return runs_to_rle(*window_to_runs(window, offset, width))


def write_submission(
    path: str | Path,
    predictions: Mapping[str, Sequence[str]],
    image_ids: Sequence[str] | None = None,
) -> Path:
    """Write ``submission.csv``: columns ``id,predicted``, one row per instance.

    Args:
        path: output file; parent folders are created. Written to a temporary file first, then
            renamed, so an interrupted run never leaves half a submission.
        predictions: ``{image_id: [rle, ...]}``; empty strings are skipped (an empty mask is not
            an instance). RLE syntax is checked, not bounds (the writer does not know sizes).
        image_ids: every image that must appear, in output order (e.g. the test folder's
            stems). An id without predictions gets one row with an empty ``predicted``.
            Default: the keys of ``predictions``, in their order.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``image_ids`` repeats an id or misses ids of ``predictions``, an id is
            empty, a value is a bare string instead of a sequence of RLE strings, or an RLE is
            malformed; the message names the id.
    """
    path = Path(path)
    ids = [str(i) for i in (predictions if image_ids is None else image_ids)]
    dups = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dups:
        raise ValueError(f"image_ids repeats id(s): {', '.join(dups)}")
    if any(not i.strip() for i in ids):
        raise ValueError("empty image id")
    wanted = set(ids)
    extra = [str(i) for i in predictions if str(i) not in wanted]
    if extra:
        raise ValueError(
            f"predictions for {len(extra)} id(s) not in image_ids: {', '.join(extra[:10])}"
            + (" ..." if len(extra) > 10 else "")
        )
    by_id = {str(k): v for k, v in predictions.items()}
    rows: list[tuple[str, str]] = []
    for image_id in ids:
        value = by_id.get(image_id, ())
        if isinstance(value, str):
            raise ValueError(f"predictions[{image_id!r}] is a string: expected a sequence of RLE strings")
        rles = []
        for k, rle in enumerate(value):
            rle = rle.strip()
            if not rle:
                continue
            try:
                _check_rle_syntax(rle)
            except ValueError as exc:
                raise ValueError(f"predictions[{image_id!r}][{k}]: {exc}") from None
            rles.append(rle)
        rows.extend((image_id, rle) for rle in rles)
        if not rles:
            rows.append((image_id, ""))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(SUBMISSION_COLUMNS)
        writer.writerows(rows)
    tmp.replace(path)
    return path


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
