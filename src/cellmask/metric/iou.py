"""RLE runs of whole images, and exact mask IoU computed on them.

IoU is exact, from the instance masks themselves (masks may overlap, on either side), and is
computed on RLE runs, never on dense ``[N, H, W]`` stacks: each truth run is compared with the
prediction runs it can overlap (binary search), so the cost grows with the runs, not with the
pixels or with ``T x P``. It agrees with ``pycocotools.mask.iou`` (the tests check it).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

import numpy as np

from cellmask.data.rle import rle_to_runs, runs_to_indices

__all__ = [
    "RLEError",
    "Runs",
    "iou_from_runs",
    "iou_matrix",
    "iou_pairs_from_runs",
    "rles_to_runs",
]

# ----------------------------------------------------------------------------------------------
# RLE parsing for a whole image at once
# ----------------------------------------------------------------------------------------------

Runs = tuple[np.ndarray, np.ndarray, np.ndarray, int]
"""``(starts, lengths, owner, n)`` of one image's ``n`` instances: int64 ``[R]`` run starts
(0-indexed flat pixel indices), run lengths and each run's instance index, as
:func:`rles_to_runs` returns."""


class RLEError(ValueError):
    """A malformed RLE in a list of RLEs; ``index`` is its position in the list given."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def rles_to_runs(rles: Sequence[str], height: int, width: int) -> Runs:
    """Parse and validate the RLEs of one image, all at once.

    Empty (or whitespace-only) strings are skipped: they are "no instance", as an empty
    ``predicted`` cell in a submission is.

    Args:
        rles: ``N`` row-major, 1-indexed RLE strings (see :mod:`cellmask.data.rle`).
        height, width: the image size.

    Returns:
        ``(starts, lengths, owner, n)``: int64 ``[R]`` arrays of 0-indexed flat run starts, run
        lengths and the instance index (``0..n-1``, in list order, empties skipped) of each run,
        and ``n`` the number of non-empty instances.

    Raises:
        RLEError: a malformed RLE; ``.index`` is its position in ``rles`` and the message is
            :func:`cellmask.data.rle.rle_to_runs`'s.
    """
    rles = list(rles)
    parsed = _fast_parse(rles, height * width) if rles else None
    if parsed is not None:
        return (*parsed[:3], len(rles))
    # Not canonical text (empties, extra whitespace, ...) or invalid: one RLE at a time, with
    # :func:`rle_to_runs`'s exact checks naming the culprit.
    kept = [i for i, r in enumerate(rles) if not isinstance(r, str) or r.strip()]
    return _slow_parse([rles[i] for i in kept], kept, height, width)


def _fast_parse(rles: list[str], n_pixels: int | np.ndarray) -> tuple[np.ndarray, ...] | None:
    """Vectorised parse of canonical RLE text; ``None`` if anything is unusual or invalid.

    Args:
        rles: ``N`` RLE strings; n_pixels: ``H * W`` of their image(s), an int or int64 ``[N]``.

    Returns:
        ``(starts, lengths, owner, counts)``: int64 ``[R]`` runs with their RLE's index, and
        int64 ``[N]`` runs per RLE.
    """
    try:
        joined = " ".join(rles)
        values = np.fromstring(joined, dtype=np.int64, sep=" ")
    except (TypeError, ValueError, AttributeError):  # not str, unparsable, or no fromstring
        return None
    # Canonical text only: every token plain decimal digits (no sign, no leading zero), tokens
    # separated by single spaces, no empty RLE. numpy also accepts other whitespace, repeated
    # separators, signs and leading zeros; each of those breaks one of these two equalities
    # (every token's text is at least its value's digits, and n tokens need n - 1 separators).
    # Then RLE k has exactly ``rles[k].count(" ") + 1`` tokens.
    n_spaces = joined.count(" ")
    if values.size != n_spaces + 1:
        return None
    n_digits = np.searchsorted(_POW10, values, side="right") + (values == 0)
    if len(joined) != int(n_digits.sum()) + n_spaces:
        return None
    counts = np.fromiter(map(str.count, rles, repeat(" ")), dtype=np.int64, count=len(rles)) + 1
    if (counts % 2).any():
        return None
    counts //= 2
    starts, lengths = values[0::2] - 1, values[1::2].copy()  # contiguous: faster downstream
    owner = np.repeat(np.arange(len(rles), dtype=np.int64), counts)
    ends = starts + lengths
    limit = n_pixels if np.isscalar(n_pixels) else np.repeat(n_pixels, counts)
    bad = (starts < 0).any() or (lengths <= 0).any() or (ends > limit).any()
    if not bad and len(starts) > 1:
        bad = bool(((starts[1:] < ends[:-1]) & (owner[1:] == owner[:-1])).any())
    return None if bad else (starts, lengths, owner, counts)


_POW10 = 10 ** np.arange(19, dtype=np.int64)  # 1, 10, ..., 1e18: digits of v = #(10^k <= v)


def _slow_parse(items: list[str], kept: list[int], height: int, width: int) -> Runs:
    """One :func:`rle_to_runs` per RLE: exact error messages, any whitespace."""
    if not items:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, 0
    runs = []
    for k, rle in enumerate(items):
        try:
            runs.append(rle_to_runs(rle, height, width))
        except ValueError as exc:
            raise RLEError(kept[k], str(exc)) from None
    starts = np.concatenate([s for s, _ in runs])
    lengths = np.concatenate([n for _, n in runs])
    owner = np.repeat(np.arange(len(runs), dtype=np.int64), [len(s) for s, _ in runs])
    return starts, lengths, owner, len(runs)


# ----------------------------------------------------------------------------------------------
# IoU
# ----------------------------------------------------------------------------------------------


def iou_pairs_from_runs(
    truth_runs: Runs, pred_runs: Runs, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact mask IoU of the truth/prediction pairs that overlap at all, from parsed runs.

    Intersections are summed run against run: each truth run is compared with the prediction
    runs that can overlap it (a binary search over the prediction runs sorted by start), so the
    cost grows with the number of runs and of overlapping pairs, not with pixels or ``T x P``.
    Masks may overlap on either side. If the candidate run pairs explode (a huge prediction
    over many others), the pixel method (:func:`_intersections_by_pixels`) takes over; both are
    exact.

    Args:
        truth_runs, pred_runs: ``(starts, lengths, owner, n)`` as :func:`rles_to_runs` returns.
        height, width: the image size.

    Returns:
        ``(ti, pj, iou)``: int64 ``[K]`` truth and prediction indices (sorted by ``ti``, then
        ``pj``) and float64 ``[K]`` IoU > 0 of the ``K`` overlapping pairs; every other pair
        has IoU 0.
    """
    _, t_lengths, t_owner, n_t = truth_runs
    _, p_lengths, p_owner, n_p = pred_runs
    if n_t == 0 or n_p == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float64)
    pairs = _intersections_by_runs(truth_runs, pred_runs)
    if pairs is None:
        pairs = _intersections_by_pixels(truth_runs, pred_runs, height * width)
    ti, pj, inter = pairs
    area_t = np.bincount(t_owner, weights=t_lengths, minlength=n_t)
    area_p = np.bincount(p_owner, weights=p_lengths, minlength=n_p)
    # union >= max(area) >= 1: empty masks were dropped when parsing
    return ti, pj, inter / (area_t[ti] + area_p[pj] - inter)


def iou_from_runs(truth_runs: Runs, pred_runs: Runs, height: int, width: int) -> np.ndarray:
    """Exact mask IoU of every truth with every prediction, from parsed runs.

    Returns:
        float64 ``[T, P]``; ``iou[i, j]`` is the IoU of truth ``i`` and prediction ``j``.
    """
    ti, pj, values = iou_pairs_from_runs(truth_runs, pred_runs, height, width)
    iou = np.zeros((truth_runs[3], pred_runs[3]), dtype=np.float64)
    iou[ti, pj] = values
    return iou


def _sum_by_pair(pair: np.ndarray, amount: np.ndarray, n_p: int) -> tuple[np.ndarray, ...]:
    """Sum ``amount`` over equal ``pair = ti * n_p + pj`` keys: ``(ti, pj, total)`` int64."""
    if len(pair) == 0:  # no truth overlaps any prediction
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, amount[:0]
    order = np.argsort(pair, kind="stable")
    pair, amount = pair[order], amount[order]
    first = np.flatnonzero(np.concatenate([[True], pair[1:] != pair[:-1]]))
    keys = pair[first]
    return keys // n_p, keys % n_p, np.add.reduceat(amount, first)


def _intersections_by_runs(
    truth_runs: Runs, pred_runs: Runs, max_pairs_per_run: int = 64
) -> tuple[np.ndarray, ...] | None:
    """Intersection areas of overlapping pairs, ``(ti, pj, inter)`` int64 ``[K]``, from run
    overlaps; ``None`` if the candidate run pairs exceed ``max_pairs_per_run`` per run."""
    t_starts, t_lengths, t_owner, _ = truth_runs
    p_starts, p_lengths, p_owner, n_p = pred_runs
    order = np.argsort(p_starts, kind="stable")
    ps, pl, po = p_starts[order], p_lengths[order], p_owner[order]
    pe_max = np.maximum.accumulate(ps + pl)  # non-decreasing even where predictions overlap
    t_ends = t_starts + t_lengths
    # Prediction runs j that may overlap truth run [a, b): ps[j] < b and (max end up to j) > a.
    lo = np.searchsorted(pe_max, t_starts, side="right")
    hi = np.searchsorted(ps, t_ends, side="left")
    n_cand = np.maximum(hi - lo, 0)
    total = int(n_cand.sum())
    if total > max_pairs_per_run * (len(t_starts) + len(ps)):
        return None
    t_idx = np.repeat(np.arange(len(t_starts)), n_cand)
    p_idx = np.arange(total) + np.repeat(lo - (np.cumsum(n_cand) - n_cand), n_cand)
    overlap = np.minimum(t_ends[t_idx], ps[p_idx] + pl[p_idx]) - np.maximum(t_starts[t_idx], ps[p_idx])
    keep = overlap > 0  # candidates after an earlier, longer run may still miss
    return _sum_by_pair(t_owner[t_idx[keep]] * n_p + po[p_idx[keep]], overlap[keep], n_p)


def _intersections_by_pixels(truth_runs: Runs, pred_runs: Runs, n_pixels: int) -> tuple[np.ndarray, ...]:
    """Intersection areas of overlapping pairs, ``(ti, pj, inter)`` int64 ``[K]``: predictions
    painted into ``H * W`` label images (one per layer of overlap), truth pixels looked up in
    them. Cost grows with the pixels; used when run pairs explode."""
    t_starts, t_lengths, t_owner, _ = truth_runs
    p_starts, p_lengths, p_owner, n_p = pred_runs
    t_pix = runs_to_indices(t_starts, t_lengths)
    t_lab = np.repeat(t_owner, t_lengths)
    p_pix = runs_to_indices(p_starts, p_lengths)
    p_lab = np.repeat(p_owner, p_lengths) + 1  # 0 = no prediction
    label = np.zeros(n_pixels, dtype=np.int32)
    label[p_pix] = p_lab
    if np.count_nonzero(label) == len(p_pix):
        layers = [label]  # predictions do not overlap: one label image holds them all
    else:
        layers = _overlap_layers(p_pix, p_lab, n_pixels)
    pairs = []
    for layer in layers:
        hit = layer[t_pix]
        sel = np.flatnonzero(hit)
        pairs.append(t_lab[sel] * n_p + (hit[sel].astype(np.int64) - 1))
    pair = np.concatenate(pairs)
    return _sum_by_pair(pair, np.ones(len(pair), dtype=np.int64), n_p)


def _overlap_layers(pix: np.ndarray, lab: np.ndarray, n_pixels: int) -> list[np.ndarray]:
    """Split overlapping instances' pixels into label images in which nothing overlaps.

    The ``k``-th instance covering a pixel (in instance order) goes to layer ``k``.

    Args:
        pix: int64 ``[M]`` flat pixel indices; lab: int ``[M]`` labels (>= 1) of those pixels.

    Returns:
        int32 ``[H * W]`` label images, as many as the deepest overlap.
    """
    order = np.argsort(pix, kind="stable")
    pix, lab = pix[order], lab[order]
    new = np.concatenate([[True], pix[1:] != pix[:-1]])
    group_start = np.maximum.accumulate(np.where(new, np.arange(len(pix)), 0))
    depth = np.arange(len(pix)) - group_start
    layers = []
    for k in range(int(depth.max()) + 1):
        sel = depth == k
        layer = np.zeros(n_pixels, dtype=np.int32)
        layer[pix[sel]] = lab[sel]
        layers.append(layer)
    return layers


def iou_matrix(truth_rles: Sequence[str], pred_rles: Sequence[str], height: int, width: int) -> np.ndarray:
    """Exact mask IoU of every truth RLE with every predicted RLE of one image.

    Agrees with ``pycocotools.mask.iou`` on the same masks (the tests check it) but is much
    faster on whole submissions: RLE text parsed per image in one go, no per-mask Python
    object, no per-pair loop (see :func:`iou_pairs_from_runs`).

    Args:
        truth_rles: ``T`` row-major RLE strings; pred_rles: ``P`` of them. Empty strings are
            skipped (they are not instances), so ``T``/``P`` count the non-empty ones.
        height, width: the image size.

    Returns:
        float64 ``[T, P]`` IoU (``[0, P]``/``[T, 0]`` when a side is empty).

    Raises:
        RLEError: a malformed RLE (a ``ValueError``; ``.index`` says which of its list).
    """
    return iou_from_runs(
        rles_to_runs(truth_rles, height, width), rles_to_runs(pred_rles, height, width), height, width
    )
