"""Run-length encoding of instance masks, exactly as the Sartorius competition uses it.

Format: a string of space-separated ``start length`` pairs. ``start`` is 1-indexed and pixels
are numbered **row-major** (C order) over the ``H x W`` image, so pixel ``(y, x)`` has number
``y * W + x + 1``. Runs are sorted, do not overlap and never touch: the encoder always merges
adjacent runs (a decoder accepts touching runs, as Kaggle's did).

A row-major RLE of an ``H x W`` mask is the column-major (COCO / pycocotools) RLE of its
``W x H`` transpose; :func:`rle_to_coco` uses that to hand masks to pycocotools without
decoding them, and IoU does not change under transposition.

Everything here is vectorised over runs: no Python loop per run or per pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "masks_to_rles",
    "rle_area",
    "rle_box",
    "rle_decode",
    "rle_encode",
    "rle_to_coco",
    "rle_to_runs",
    "rles_to_label_image",
    "rles_to_masks",
    "runs_box",
    "runs_to_indices",
    "runs_to_rle",
]


def rle_to_runs(rle: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse and validate an RLE string.

    Args:
        rle: ``"start length start length ..."``; starts 1-indexed, row-major. ``""`` (or only
            whitespace) is the empty mask.
        height, width: image size the RLE refers to.

    Returns:
        ``(starts, lengths)``: int64 arrays of shape ``[R]``; ``starts`` are **0-indexed** flat
        pixel indices into the row-major ``H x W`` array.

    Raises:
        ValueError: odd token count, a non-integer token, a start < 1, a length < 1, a run
            that ends beyond ``H * W``, or runs that are unsorted or overlap. The message
            says which pair is at fault.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if not isinstance(rle, str):
        raise ValueError(f"RLE must be a string, got {type(rle).__name__}")
    tokens = rle.split()
    if not tokens:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if len(tokens) % 2:
        raise ValueError(f"RLE has an odd number of tokens ({len(tokens)}): expected start/length pairs")
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next((t for t in tokens if not _is_int(t)), None)
        if bad is not None:
            raise ValueError(f"RLE token {bad!r} is not an integer") from None
        big = next(t for t in tokens if abs(int(t)) >= 2**63)
        raise ValueError(f"RLE token {big!r} is too large for a pixel index") from None
    starts, lengths = values[0::2] - 1, values[1::2]
    n_pixels = height * width
    if (starts < 0).any():
        i = int(np.argmax(starts < 0))
        raise ValueError(f"RLE pair {i}: start {starts[i] + 1} is < 1 (starts are 1-indexed)")
    if (lengths <= 0).any():
        i = int(np.argmax(lengths <= 0))
        raise ValueError(f"RLE pair {i}: length {lengths[i]} is not positive")
    ends = starts + lengths
    if (ends > n_pixels).any():
        i = int(np.argmax(ends > n_pixels))
        raise ValueError(
            f"RLE pair {i}: run {starts[i] + 1}+{lengths[i]} ends beyond the image "
            f"({height}x{width} = {n_pixels} pixels)"
        )
    if len(starts) > 1:
        bad = starts[1:] < ends[:-1]
        if bad.any():
            i = int(np.argmax(bad)) + 1
            kind = "unsorted" if starts[i] < starts[i - 1] else "overlapping"
            raise ValueError(
                f"RLE pair {i}: {kind} runs (start {starts[i] + 1} < end of previous run {ends[i - 1]})"
            )
    return starts, lengths


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def runs_to_rle(starts: np.ndarray, lengths: np.ndarray) -> str:
    """Format 0-indexed ``starts`` and ``lengths`` (int arrays ``[R]``) as an RLE string."""
    if len(starts) == 0:
        return ""
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2] = np.asarray(starts, dtype=np.int64) + 1
    pairs[1::2] = lengths
    return " ".join(pairs.astype(str).tolist())


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode one RLE string into a mask.

    Returns:
        bool array of shape ``[height, width]``.
    """
    starts, lengths = rle_to_runs(rle, height, width)
    flat = np.zeros(height * width + 1, dtype=np.int8)
    # +1 at each run start, -1 after each run end, then a cumulative sum fills the runs.
    # Starts are unique and so are ends (runs are sorted and disjoint): plain indexing is safe.
    flat[starts] += 1
    flat[starts + lengths] -= 1
    return np.cumsum(flat[:-1], dtype=np.int8).astype(bool).reshape(height, width)


def mask_to_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of a 2-D mask: 0-indexed row-major ``starts`` and ``lengths`` (int64 ``[R]``)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H x W), got shape {tuple(mask.shape)}")
    flat = np.concatenate([[False], np.asarray(mask, dtype=bool).ravel(order="C"), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return starts.astype(np.int64), (ends - starts).astype(np.int64)


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (bool or 0/1, shape ``[H, W]``) as a row-major, 1-indexed RLE string.

    The empty mask encodes as ``""``.
    """
    return runs_to_rle(*mask_to_runs(mask))


def rle_area(rle: str, height: int, width: int) -> int:
    """Number of foreground pixels of an RLE, without decoding it."""
    return int(rle_to_runs(rle, height, width)[1].sum())


def rle_box(rle: str, height: int, width: int) -> np.ndarray:
    """Bounding box of an RLE without decoding it (see :func:`runs_box`)."""
    starts, lengths = rle_to_runs(rle, height, width)
    return runs_box(starts, lengths, width)


def runs_box(starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Bounding box of validated runs (0-indexed row-major ``starts``, ``lengths``).

    Returns:
        float32 ``[4]`` xyxy in pixel-edge coordinates: a mask covering columns ``x0..x1`` and
        rows ``y0..y1`` (inclusive) has box ``[x0, y0, x1 + 1, y1 + 1]``. No runs give
        ``[0, 0, 0, 0]``.
    """
    if len(starts) == 0:
        return np.zeros(4, dtype=np.float32)
    last = starts + lengths - 1
    y0, y1 = starts // width, last // width
    x0, x1 = starts % width, last % width
    # A run that continues onto a later row reaches both the right and the left image edge.
    wraps = y1 > y0
    x_min = np.where(wraps, 0, x0)
    x_max = np.where(wraps, width - 1, x1)
    return np.array([x_min.min(), y0.min(), x_max.max() + 1, y1.max() + 1], dtype=np.float32)


def rle_to_coco(rle: str, height: int, width: int) -> dict:
    """Convert a row-major RLE to an uncompressed COCO RLE of the transposed ``W x H`` mask.

    pycocotools reads column-major RLE; the column-major order of the ``W x H`` transpose is the
    row-major order of the ``H x W`` mask, so the runs carry over unchanged. Use the result
    with ``pycocotools.mask.frPyObjects`` (IoU and area are transpose-invariant).

    Returns:
        ``{"size": [width, height], "counts": [zeros, ones, zeros, ...]}``.
    """
    starts, lengths = rle_to_runs(rle, height, width)
    counts = np.empty(2 * len(starts) + 1, dtype=np.int64)
    counts[1:-1:2] = lengths
    prev_end = np.concatenate([[0], starts + lengths])
    counts[0:-1:2] = starts - prev_end[:-1]
    counts[-1] = height * width - prev_end[-1]
    return {"size": [width, height], "counts": counts.tolist()}


def masks_to_rles(masks: np.ndarray) -> list[str]:
    """Encode a stack of masks ``[N, H, W]`` (bool/uint8) into ``N`` RLE strings."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    return [rle_encode(m) for m in masks]


def rles_to_masks(rles: Sequence[str], height: int, width: int) -> np.ndarray:
    """Decode ``N`` RLE strings into a bool stack ``[N, H, W]``."""
    out = np.zeros((len(rles), height, width), dtype=bool)
    for i, rle in enumerate(rles):
        out[i] = rle_decode(rle, height, width)
    return out


def rles_to_label_image(rles: Sequence[str], height: int, width: int) -> np.ndarray:
    """Paint ``N`` RLEs into one int32 ``[H, W]`` label image (instance ``i`` -> ``i + 1``).

    Where instances overlap, the later one wins; 0 is background.
    """
    flat = np.zeros(height * width, dtype=np.int32)
    for i, rle in enumerate(rles):
        starts, lengths = rle_to_runs(rle, height, width)
        if len(starts):
            flat[runs_to_indices(starts, lengths)] = i + 1
    return flat.reshape(height, width)


def runs_to_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat pixel indices covered by runs (0-indexed ``starts``, ``lengths``), vectorised.

    Returns:
        int64 ``[sum(lengths)]``, in run order (sorted for validated runs); empty for no runs.
    """
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int64)
    before = np.cumsum(lengths) - lengths  # pixels of earlier runs
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - before, lengths)
