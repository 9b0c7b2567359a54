"""Writing ``submission.csv``: rows from instance masks or from mask windows, without building a
full-image ``[N, H, W]`` stack."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cellmask.data.rle import rle_encode, runs_to_rle
from cellmask.submission.format import SUBMISSION_COLUMNS, _check_rle_syntax


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
