"""The fast path of :func:`cellmask.metric.score_files`: a bytes-level scan of plain CSVs.

A second CSV parser beside the general one (:func:`cellmask.metric.read_truth_csv` and
:func:`cellmask.submission.read_submission`), kept because it makes ``cellmask score`` on a
train-set-sized submission much faster (``benchmarks/bench_metric.py``). It takes only plain,
valid files and answers ``None`` for anything else, so every error is worded by the general
path; the tests check that both give the same :class:`~cellmask.metric.ScoreReport`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np

from cellmask.metric.iou import Runs
from cellmask.metric.scoring import ScoreReport, score_runs

__all__ = ["score_plain_files"]


@dataclass
class _Scan:
    """A CSV of RLEs scanned in bulk (see :func:`_scan_csv`).

    Attributes:
        ids: image ids in first-appearance order.
        first: ``{column: [its value on the image's first row, per image]}`` for the extra
            columns asked for.
        consistent: whether every row of an image has the same values in the extra columns.
        starts, lengths: int64 ``[R]`` runs (0-indexed starts) of every instance of the file,
            instances grouped by image in ``ids`` order, in file order within an image.
        counts: int64 ``[N]`` runs per instance (in that order).
        n_inst: int64 ``[len(ids)]`` instances per image.
    """

    ids: list[str]
    first: dict[str, list[str]]
    consistent: bool
    starts: np.ndarray
    lengths: np.ndarray
    counts: np.ndarray
    n_inst: np.ndarray

    def runs(self, n_pixels: np.ndarray) -> list[Runs] | None:
        """Validated runs per image (``n_pixels``: int64 ``[len(ids)]`` = ``H * W``), or
        ``None`` if any RLE is invalid (the slow path then names it)."""
        starts, lengths, counts, n_inst = self.starts, self.lengths, self.counts, self.n_inst
        if len(starts) and (starts.min() < 0 or lengths.min() <= 0):
            return None
        ends = starts + lengths
        inst_end = np.cumsum(counts)  # run index after each instance
        run_cut = np.concatenate([[0], inst_end])[np.concatenate([[0], np.cumsum(n_inst)])]
        if (n_pixels == n_pixels[0]).all():
            too_far = len(ends) and ends.max() > n_pixels[0]
        else:
            too_far = (ends > np.repeat(n_pixels, np.diff(run_cut))).any()
        if too_far:
            return None
        # Runs must be sorted and disjoint within an instance (not across instances).
        gap = starts[1:] - ends[:-1]
        gap[inst_end[:-1] - 1] = 0
        if (gap < 0).any():
            return None
        inst_local = np.arange(len(counts)) - np.repeat(np.cumsum(n_inst) - n_inst, n_inst)
        owner = np.repeat(inst_local, counts)
        cut = run_cut.tolist()
        return [
            (starts[a:b], lengths[a:b], owner[a:b], n)
            for a, b, n in zip(cut[:-1], cut[1:], n_inst.tolist(), strict=True)
        ]


def _scan_csv(path: Path, value_col: str, extra_cols: Sequence[str] = ()) -> _Scan | None:
    """Parse a CSV of RLEs (``id``, ``value_col``, ...) in bulk, on its bytes, with numpy.

    The fast path of :func:`cellmask.metric.score_files`: no csv module, no Python object per row (only one
    ``bytes`` per RLE field), one ``fromstring`` for every number of the file. It only takes
    plain files -- ASCII, ``\\n`` or ``\\r\\n`` line ends, no quotes, no blank line, every
    row with the header's field count, ids without surrounding spaces, RLEs as digits separated
    by single spaces -- and returns ``None`` for anything else (the general path then reads the
    file, and names any error).
    """
    if not path.is_file():
        return None
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n")
    if not raw.isascii() or b'"' in raw or b"\r" in raw:
        return None
    if not raw.endswith(b"\n"):
        raw += b"\n"
    header = [h.strip() for h in raw[: raw.index(b"\n")].decode("ascii").split(",")]
    if any(c not in header for c in ("id", value_col, *extra_cols)):
        return None
    n_cols = len(header)
    data = np.frombuffer(raw, dtype=np.uint8)
    scratch = np.empty(len(data), dtype=bool)  # one buffer for the byte comparisons
    newlines = np.flatnonzero(np.equal(data, 10, out=scratch))
    line_start, line_end = newlines[:-1] + 1, newlines[1:]
    n_rows = len(line_end)
    if n_rows == 0 or (line_end == line_start).any():
        return None
    commas = np.flatnonzero(np.equal(data, 44, out=scratch))
    del scratch
    commas = commas[commas > newlines[0]]
    # Exactly n_cols - 1 commas on every line: as many in all, and the right count before each.
    if len(commas) != n_rows * (n_cols - 1):
        return None
    if n_cols > 1 and (np.searchsorted(commas, line_start) != np.arange(n_rows) * (n_cols - 1)).any():
        return None
    commas = commas.reshape(n_rows, n_cols - 1)
    field_start = np.concatenate([line_start[:, None], commas + 1], axis=1)
    field_end = np.concatenate([commas, line_end[:, None]], axis=1)

    def strings(name: str, rows: np.ndarray) -> list[str]:
        k = header.index(name)
        bounds = zip(field_start[rows, k].tolist(), field_end[rows, k].tolist(), strict=True)
        return [raw[a:b].decode("ascii") for a, b in bounds]

    # Image of each row: rows come in blocks of one id (usually one block per image); only the
    # first row of a block becomes a Python string.
    k = header.index("id")
    id_start, id_end = field_start[:, k], field_end[:, k]
    if (id_end == id_start).any():
        return None
    new_block = np.ones(n_rows, dtype=bool)
    new_block[1:] = ~_same_as_previous(data, id_start, id_end)
    block_row = np.flatnonzero(new_block)
    block_ids = strings("id", block_row)
    index = {image_id: i for i, image_id in enumerate(dict.fromkeys(block_ids))}
    if not all(k == k.strip() for k in index):
        return None
    block_image = np.array([index[i] for i in block_ids], dtype=np.int64)
    row_image = np.repeat(block_image, np.diff(np.append(block_row, n_rows)))
    first_row = block_row[np.unique(block_image, return_index=True)[1]]
    first, consistent = {}, True
    for name in extra_cols:
        k = header.index(name)
        first[name] = strings(name, first_row)
        consistent = consistent and _same_as_first(
            data, field_start[:, k], field_end[:, k], first_row[row_image]
        )

    # The numbers: every RLE field of the file joined by spaces and parsed in one go.
    k = header.index(value_col)
    fields = list(map(raw.__getitem__, map(slice, field_start[:, k].tolist(), field_end[:, k].tolist())))
    joined = b" ".join(fields)
    # Only digits and spaces; then a field's tokens are at most its spaces + 1, with equality
    # only for single spaces between tokens, so equal totals below mean canonical text.
    if joined.translate(None, b"0123456789 "):
        return None
    n_spaces = np.fromiter(map(bytes.count, fields, repeat(b" ")), dtype=np.int64, count=n_rows)
    tokens = np.where(field_end[:, k] > field_start[:, k], n_spaces + 1, 0)
    n_tokens = int(tokens.sum())
    if (tokens % 2).any():
        return None
    # (fromstring of blanks alone gives [0], hence the guard)
    values = np.fromstring(joined, dtype=np.int64, sep=" ") if n_tokens else np.zeros(0, np.int64)
    if values.size != n_tokens:
        return None

    # Instances = rows with an RLE; group them by image (stable), runs follow their instance.
    inst_row = np.flatnonzero(tokens)
    counts = tokens[inst_row] // 2
    inst_image = row_image[inst_row]
    starts, lengths = values[0::2] - 1, values[1::2].copy()  # contiguous: faster downstream
    if len(inst_image) > 1 and (inst_image[1:] < inst_image[:-1]).any():
        order = np.argsort(inst_image, kind="stable")
        first_run = np.cumsum(counts) - counts
        counts, inst_image = counts[order], inst_image[order]
        run_order = np.arange(int(counts.sum())) + np.repeat(
            first_run[order] - (np.cumsum(counts) - counts), counts
        )
        starts, lengths = starts[run_order], lengths[run_order]
    return _Scan(
        ids=list(index),
        first=first,
        consistent=consistent,
        starts=starts,
        lengths=lengths,
        counts=counts,
        n_inst=np.bincount(inst_image, minlength=len(index)),
    )


def _field_matrix(data: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray | None:
    """uint8 ``[n, L]``: the bytes of ``n`` fields ``data[start:end]`` that all have length
    ``L`` (ids usually do), or ``None`` when their lengths differ."""
    length = end - start
    if len(length) == 0 or (length != length[0]).any():
        return None
    return data[start[:, None] + np.arange(length[0])]


def _same_as_previous(data: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """bool ``[n - 1]``: whether field ``i + 1`` (``data[start:end]``) equals field ``i``."""
    matrix = _field_matrix(data, start, end)
    if matrix is not None:
        return (matrix[1:] == matrix[:-1]).all(axis=1)
    length = end - start
    same = length[1:] == length[:-1]
    rows = np.flatnonzero(same) + 1  # compare these rows' bytes with the previous row's
    n = length[rows]
    offset = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    equal = data[np.repeat(start[rows], n) + offset] == data[np.repeat(start[rows - 1], n) + offset]
    row_of_byte = np.repeat(np.arange(len(rows)), n)
    differs = np.bincount(row_of_byte[~equal], minlength=len(rows)) > 0
    same[rows - 1] = ~differs
    return same


def _same_as_first(data: np.ndarray, start: np.ndarray, end: np.ndarray, ref: np.ndarray) -> bool:
    """Whether every field ``data[start[i]:end[i]]`` equals the field of row ``ref[i]``."""
    matrix = _field_matrix(data, start, end)
    if matrix is not None:
        return bool((matrix == matrix[ref]).all())
    length = end - start
    if (length != length[ref]).any():
        return False
    offset = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    return bool(
        (data[np.repeat(start, length) + offset] == data[np.repeat(start[ref], length) + offset]).all()
    )


def score_plain_files(truth_csv: Path, pred_csv: Path) -> ScoreReport | None:
    """:func:`cellmask.metric.score_files` on plain, valid files through :func:`_scan_csv`; ``None`` when
    anything is unusual or wrong (the general path then runs and reports it)."""
    truth = _scan_csv(truth_csv, "annotation", ("height", "width", "cell_type"))
    if truth is None or not truth.consistent:
        return None
    pred = _scan_csv(pred_csv, "predicted")
    if pred is None:
        return None
    try:
        heights = np.array(truth.first["height"], dtype=np.int64)
        widths = np.array(truth.first["width"], dtype=np.int64)
    except ValueError:
        return None
    if (heights <= 0).any() or (widths <= 0).any():
        return None
    truth_runs = truth.runs(heights * widths)
    where = {image_id: i for i, image_id in enumerate(truth.ids)}
    pred_image = [where.get(image_id) for image_id in pred.ids]
    if truth_runs is None or None in pred_image:
        return None
    pred_runs_found = pred.runs(heights[pred_image] * widths[pred_image])
    if pred_runs_found is None:
        return None
    empty = np.zeros(0, dtype=np.int64)
    pred_runs: list[Runs] = [(empty, empty, empty, 0)] * len(truth.ids)
    for i, runs in zip(pred_image, pred_runs_found, strict=True):
        pred_runs[i] = runs
    cell_types = [c.strip() or None for c in truth.first["cell_type"]]
    sizes = list(zip(heights.tolist(), widths.tolist(), strict=True))
    return score_runs(truth.ids, cell_types, sizes, truth_runs, pred_runs)
