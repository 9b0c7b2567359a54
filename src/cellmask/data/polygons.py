"""COCO polygons (LIVECell's segmentations) to pixels, without full-frame masks.

LIVECell images carry 1000+ instances, each a COCO polygon list ``[[x0, y0, x1, y1, ...], ...]``.
Rasterising each one into a full ``H x W`` bool mask and scanning it (``np.flatnonzero``) costs
``O(H * W)`` per instance. Here pycocotools rasterises the polygon into its run-length form
(``frPyObjects`` + ``merge``: ``O(perimeter)``, no pixel array), the compressed counts are decoded
with numpy (:func:`coco_counts`) and the runs become flat pixel indices directly
(:func:`polygon_indices`): ``O(perimeter + area)`` per instance.

The pixels are exactly those of the full-frame pycocotools rasterisation, which is what
LIVECell's own evaluation uses: they *are* that rasterisation, only never expanded to ``H x W``.
(A per-instance window with the polygon shifted by an integer offset is not exact: pycocotools
interpolates the polygon edges in floating point on absolute coordinates, so a shifted polygon
can round a boundary point differently.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellmask.data.rle import runs_to_indices

__all__ = ["coco_counts", "coco_counts_to_indices", "polygon_indices", "polygons_to_mask"]


def coco_counts(counts: bytes | str) -> np.ndarray:
    """Decode COCO's compressed RLE string (pycocotools' ``counts``) into run lengths.

    The string holds one variable-length value per run: 5 data bits per character (offset 48),
    bit ``0x20`` meaning "more characters follow", the last character's bit ``0x10`` the sign;
    from the fourth run on, a value is the difference to the run two places earlier.

    Returns:
        int64 ``[R]`` run lengths over the column-major (Fortran-order) pixel sequence,
        alternating background/foreground and starting with background.
    """
    b = np.frombuffer(counts.encode() if isinstance(counts, str) else counts, dtype=np.uint8)
    if len(b) == 0:
        return np.zeros(0, dtype=np.int64)
    b = b.astype(np.int64) - 48
    last = np.flatnonzero((b & 0x20) == 0)  # last character of each value
    first = np.concatenate([[0], last[:-1] + 1])
    chunk = np.arange(len(b)) - np.repeat(first, last - first + 1)  # position within its value
    values = np.add.reduceat((b & 0x1F) << (5 * chunk), first)
    negative = (b[last] & 0x10) != 0
    values = np.where(negative, values - (np.int64(1) << (5 * (chunk[last] + 1))), values)
    out = values.copy()
    out[1::2] = np.cumsum(values[1::2])  # run m >= 3 adds run m - 2
    out[2::2] = np.cumsum(values[2::2])
    return out


def coco_counts_to_indices(counts: np.ndarray, height: int, width: int) -> np.ndarray:
    """Flat row-major pixel indices (sorted int64) of column-major run lengths (:func:`coco_counts`)."""
    ends = np.cumsum(counts)
    starts, lengths = (ends - counts)[1::2], counts[1::2]
    keep = lengths > 0
    column_major = runs_to_indices(starts[keep], lengths[keep])
    return np.sort((column_major % height) * width + column_major // height)


def polygon_indices(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Pixels of one instance given as COCO polygons, rasterised exactly as pycocotools does.

    Args:
        polygons: ``[[x0, y0, x1, y1, ...], ...]`` (at least 3 points each; several polygons are
            united); coordinates may lie outside the image, the pixels are clipped to it.
        height, width: the image size.

    Returns:
        sorted int64 flat row-major indices into ``H x W`` (``y * W + x``); empty if none.
    """
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    rle = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
    return coco_counts_to_indices(coco_counts(rle["counts"]), height, width)


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons as a bool ``[H, W]`` mask (the pixels of :func:`polygon_indices`)."""
    mask = np.zeros(height * width, dtype=bool)
    mask[polygon_indices(polygons, height, width)] = True
    return mask.reshape(height, width)
