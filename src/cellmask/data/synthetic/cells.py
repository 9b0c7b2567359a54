"""Cell geometry and placement: outlines of bodies and processes, rasterised into crops.

A cell is drawn as outlines (:func:`make_cell`), filled into a small crop (:class:`Instance`)
and placed (:func:`place_cells`): it loses the pixels of cells placed before it, so touching
cells meet rather than overlap, except for the few kept whole and a one-pixel growth of many
(as hand-drawn masks overlap slightly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from cellmask.data.rle import mask_to_runs, runs_to_rle
from cellmask.data.synthetic.styles import CellStyle

__all__ = [
    "Cell",
    "Instance",
    "body_outline",
    "cell_centres",
    "centreline",
    "make_cell",
    "place_cells",
    "rasterise",
]

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


# --------------------------------------------------------------------------------------------
# Instances
# --------------------------------------------------------------------------------------------


@dataclass
class Instance:
    """One cell's mask as a crop: ``mask`` is bool ``[h, w]`` placed at rows ``y0..``, cols ``x0..``."""

    y0: int
    x0: int
    mask: np.ndarray

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def box(self) -> np.ndarray:
        """float32 ``[4]`` xyxy in pixel-edge coordinates (tight around the mask)."""
        rows, cols = np.flatnonzero(self.mask.any(1)), np.flatnonzero(self.mask.any(0))
        return np.array(
            [self.x0 + cols[0], self.y0 + rows[0], self.x0 + cols[-1] + 1, self.y0 + rows[-1] + 1],
            dtype=np.float32,
        )

    def full(self, height: int, width: int) -> np.ndarray:
        """The mask pasted into a bool ``[height, width]`` image."""
        out = np.zeros((height, width), dtype=bool)
        h, w = self.mask.shape
        out[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = self.mask
        return out

    def rle(self, height: int, width: int) -> str:
        """Row-major, 1-indexed RLE over the ``height x width`` image (as in ``train.csv``).

        Encodes a band of full-width rows rather than the whole image: same runs, less work.
        """
        h, w = self.mask.shape
        band = np.zeros((h, width), dtype=bool)
        band[:, self.x0 : self.x0 + w] = self.mask
        starts, lengths = mask_to_runs(band)
        return runs_to_rle(starts + self.y0 * width, lengths)

    def polygons(self) -> list[list[float]]:
        """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` (one per connected part, >= 3 points).

        Traced on the 2x-upsampled mask, so the polygon runs a quarter pixel inside the pixel
        edges: rasterised again (pycocotools, as LIVECell's evaluation does) it gives back the
        same pixels, where a contour through pixel centres would lose the outer half-pixel.
        """
        up = cv2.resize(self.mask.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        out = []
        for c in contours:
            if len(c) < 3:
                continue
            pts = (c.reshape(-1, 2).astype(np.float64) + 0.5) / 2 + (self.x0, self.y0)
            out.append(np.round(pts, 2).ravel().tolist())
        return out


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def body_outline(
    rng: np.random.Generator,
    radius: float,
    elongation: float,
    irregularity: float,
    angle: float,
    n_points: int = 28,
) -> np.ndarray:
    """Closed outline of a cell body around the origin: float ``[P, 2]`` (x, y).

    A circle whose radius carries random harmonics 2..5 (decaying amplitudes), stretched by
    ``elongation`` along ``angle`` with the area kept.
    """
    theta = np.linspace(0.0, 2 * np.pi, n_points, endpoint=False)
    k = np.arange(2, 6)[:, None]
    amps = rng.normal(0.0, irregularity, size=(4, 1)) / np.sqrt(k - 1)
    phases = rng.uniform(0.0, 2 * np.pi, size=(4, 1))
    r = radius * (1.0 + (amps * np.cos(k * theta + phases)).sum(0))
    r = np.clip(r, 0.4 * radius, 1.8 * radius)
    s = math.sqrt(elongation)
    pts = np.stack([r * np.cos(theta) * s, r * np.sin(theta) / s], axis=1)
    return _rotate(pts, angle)


def centreline(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    length: float,
    wander: float,
    step: float = 4.0,
) -> np.ndarray:
    """A random-walk path from ``start``: float ``[P, 2]`` points ``step`` apart."""
    n = max(2, int(length / step) + 1)
    turns = rng.normal(0.0, wander, size=n - 1)
    headings = heading + np.cumsum(turns)
    steps = np.stack([np.cos(headings), np.sin(headings)], axis=1) * (length / (n - 1))
    return np.concatenate([start[None], start[None] + np.cumsum(steps, axis=0)])


def _arm_outline(
    rng: np.random.Generator, start: np.ndarray, heading: float, length: float, base_width: float
) -> np.ndarray:
    """A tapering process: a closed outline ``[2P, 2]`` along a gently curving path."""
    path = centreline(rng, start, heading, length, wander=0.12)
    d = np.gradient(path, axis=0)
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1) / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-6)
    t = np.linspace(0.0, 1.0, len(path))[:, None]
    half = 0.5 * (base_width * (1.0 - t) ** 1.3 + 1.2)
    return np.concatenate([path + normal * half, (path - normal * half)[::-1]])


@dataclass
class Cell:
    """A cell before carving: its outlines (global coords) and optical extras."""

    centre: np.ndarray
    outlines: list[np.ndarray]
    radius: float
    amp: float
    flat: bool
    fibres: list[np.ndarray]


def make_cell(rng: np.random.Generator, style: CellStyle, centre: np.ndarray) -> Cell:
    """One cell of ``style`` around ``centre`` (float ``[2]``, x, y), not yet rasterised.

    A flat cell (``flat_frac`` of them) is one large faint body; any other is a body with
    ``arms`` tapering processes (part of the mask) and ``fibres`` thin ones (not in the mask).
    """
    flat = bool(rng.random() < style.flat_frac)
    angle = rng.uniform(0.0, np.pi)
    if flat:
        radius = rng.uniform(*style.flat_radius)
        body = body_outline(rng, radius, rng.uniform(1.2, 2.5), 0.22, angle, 40)
        outlines, amp = [centre + body], style.body_amp * rng.uniform(0.35, 0.55)
    else:
        radius = rng.uniform(*style.radius)
        elong = rng.uniform(*style.elongation)
        body = body_outline(rng, radius, elong, style.irregularity, angle)
        outlines, amp = [centre + body], style.body_amp * rng.uniform(0.7, 1.1)
        n_arms = int(rng.integers(style.arms[0], style.arms[1] + 1))
        # Arms leave along the long axis first (spindle), then anywhere.
        headings = [angle, angle + np.pi][:n_arms] + list(rng.uniform(0, 2 * np.pi, max(0, n_arms - 2)))
        base = 2.0 * radius / math.sqrt(elong) * style.arm_width
        for h in headings:
            h = h + rng.normal(0.0, 0.25)
            length = radius * rng.uniform(*style.arm_length)
            outlines.append(_arm_outline(rng, centre, h, length + radius, base))
    fibres = []
    for j in range(int(rng.integers(style.fibres[0], style.fibres[1] + 1))):
        # Radiating (cort) or leaving from the ends of the long axis (shsy5y, astro).
        h = (
            rng.uniform(0.0, 2 * np.pi)
            if style.fibre_radial
            else angle + np.pi * (j % 2) + rng.normal(0, 0.3)
        )
        start = centre + radius * 0.7 * np.array([math.cos(h), math.sin(h)])
        length = rng.uniform(*style.fibre_length)
        fibres.append(centreline(rng, start, h, length, wander=style.fibre_wander, step=6.0))
    return Cell(centre, outlines, radius, amp, flat, fibres)


def rasterise(outlines: list[np.ndarray], height: int, width: int, pad: int = 2) -> Instance | None:
    """Fill the union of outlines into a crop clipped to the image; ``None`` if fully outside."""
    pts = np.concatenate(outlines)
    x0 = max(int(np.floor(pts[:, 0].min())) - pad, 0)
    y0 = max(int(np.floor(pts[:, 1].min())) - pad, 0)
    x1 = min(int(np.ceil(pts[:, 0].max())) + pad + 1, width)
    y1 = min(int(np.ceil(pts[:, 1].max())) + pad + 1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    crop = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    shift = 3  # sub-pixel vertices (1/8 px)
    for outline in outlines:
        poly = np.round((outline - (x0, y0)) * (1 << shift)).astype(np.int32)
        cv2.fillPoly(crop, [poly], 1, lineType=cv2.LINE_8, shift=shift)
    return Instance(y0, x0, crop.astype(bool))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    if n <= 2:
        return mask
    keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == keep


def cell_centres(rng: np.random.Generator, n: int, style: CellStyle, height: int, width: int) -> np.ndarray:
    """Cell centres ``[n, 2]`` (x, y): a share in groups around random points, the rest uniform."""
    n_grouped = int(n * style.cluster_frac + 0.5)
    n_groups = max(1, int(n_grouped / style.cluster_size + 0.5))
    groups = rng.uniform((0, 0), (width, height), size=(n_groups, 2))
    which = rng.integers(0, n_groups, size=n_grouped)
    grouped = groups[which] + rng.normal(0.0, style.cluster_spread, size=(n_grouped, 2))
    loose = rng.uniform((0, 0), (width, height), size=(n - n_grouped, 2))
    pts = np.concatenate([grouped, loose])
    return np.clip(pts, (-5, -5), (width + 5, height + 5))


def place_cells(
    rng: np.random.Generator, cells: list[Cell], style: CellStyle, height: int, width: int
) -> tuple[list[Instance], list[Cell]]:
    """Rasterise cells in order; a cell loses the pixels already taken (so neighbours touch
    rather than overlap), keeps its largest piece, and is dropped if too little is left. A
    few cells (``loose_frac``) keep their whole mask; ``grow_frac`` grow by a pixel afterwards,
    so touching masks overlap slightly, as hand-drawn polygons do."""
    taken = np.zeros((height, width), dtype=bool)
    kept: list[Instance] = []
    kept_cells: list[Cell] = []
    for cell in cells:
        inst = rasterise(cell.outlines, height, width)
        if inst is None:
            continue
        full_area = inst.area
        if full_area == 0:
            continue
        h, w = inst.mask.shape
        window = taken[inst.y0 : inst.y0 + h, inst.x0 : inst.x0 + w]
        if rng.random() >= style.loose_frac:
            inst.mask &= ~window
            inst.mask = _largest_component(inst.mask)
        area = inst.area
        if area < max(style.min_area, 0.55 * full_area):
            continue
        window |= inst.mask
        kept.append(inst)
        kept_cells.append(cell)
    grow = rng.random(len(kept)) < style.grow_frac
    for inst, g in zip(kept, grow, strict=True):
        if g:
            inst.mask = cv2.dilate(inst.mask.astype(np.uint8), _CROSS).astype(bool)
    return [_trim(i) for i in kept], kept_cells


def _trim(inst: Instance) -> Instance:
    """Crop to the mask's tight box."""
    rows, cols = np.flatnonzero(inst.mask.any(1)), np.flatnonzero(inst.mask.any(0))
    return Instance(
        inst.y0 + int(rows[0]),
        inst.x0 + int(cols[0]),
        inst.mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy(),
    )
