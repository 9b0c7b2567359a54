"""A synthetic stand-in for the Sartorius competition data and LIVECell, in their exact layout.

``cellmask synth OUT`` writes, under ``OUT``::

    train.csv                       one row per instance, the competition's nine columns
    train/<id>.png                  annotated images (8-bit gray, 520x704 by default)
    train_semi_supervised/<id>.png  unlabeled images
    test/<id>.png                   test images
    sample_submission.csv           id,predicted (empty predictions)
    LIVECell_dataset_2021/images/livecell_train_val_images/<name>.tif
    LIVECell_dataset_2021/images/livecell_test_images/<name>.tif
    LIVECell_dataset_2021/annotations/LIVECell/livecell_coco_{train,val,test}.json

so every reader, dataset and notebook runs on it unchanged. The same seed gives the same bytes.

Images imitate phase-contrast microscopy: each cell adds to an optical-thickness map, and the
image is a high-pass of that map (dark rims inside objects, bright halos around them) over a
textured, unevenly lit gray background. Per cell type (:data:`CELL_STYLES`):

- ``shsy5y``: hundreds of small, irregular, elongated cells, crowded and touching, with short
  neurites, clusters of dead-cell blebs and a faint carpet of unannotated flat cells;
- ``cort``: a few dozen small round somata in small groups, long thin processes radiating from
  them (not part of the masks) and many dark debris dots;
- ``astro``: fewer, larger cells: spindle bodies with long tapering arms (part of the masks) and
  some large, faint, flat cells.

As in the real annotations, masks of touching cells may overlap by a pixel or two and a few
cells overlap more. Instances are produced as small crops (:class:`Instance`), so hundreds of
cells per image cost milliseconds; full-size masks are only built on request.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cellmask.data.rle import mask_to_runs, runs_to_rle
from cellmask.data.sartorius import TRAIN_COLUMNS
from cellmask.errors import DataError

__all__ = [
    "CELL_STYLES",
    "COMPETITION_TYPES",
    "LIVECELL_STYLES",
    "LIVECELL_TYPES",
    "TRAIN_COLUMNS",
    "CellStyle",
    "Instance",
    "SyntheticSample",
    "cli_synth",
    "parse_size",
    "synth_image",
    "write_dataset",
]

COMPETITION_TYPES: tuple[str, ...] = ("shsy5y", "cort", "astro")
LIVECELL_TYPES: tuple[str, ...] = ("A172", "BT474", "BV2", "Huh7", "MCF7", "SHSY5Y", "SkBr3", "SKOV3")
_REF_AREA = 520 * 704  # counts in CellStyle are per image of the competition's size
_MIN_SIZE = 32
_COCO_DESCRIPTION = "cellmask synthetic LIVECell stand-in"
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


# --------------------------------------------------------------------------------------------
# Styles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellStyle:
    """How one cell type looks. Lengths in pixels; counts per 520x704 image (scaled by area).

    Attributes:
        count: mean number of annotated cells (drawn +-``count_jitter`` relative).
        radius: body radius range (uniform), before elongation (area-preserving).
        elongation: aspect ratio range of the body.
        irregularity: amplitude of the random harmonics of the body outline.
        arms: range of tapering processes that belong to the mask.
        arm_length, arm_width: their length range (in body radii) and base width (fraction of
            the body's minor diameter).
        flat_frac: fraction of cells that are large, faint and flat (``flat_radius``).
        fibres: range of thin processes per cell that are *not* in the mask; ``fibre_length``
            their length range; ``fibre_radial``: they radiate every way (cort) rather than
            leave from the ends of the long axis; ``fibre_wander``: their curvature.
        cluster_frac, cluster_size, cluster_spread: how many cells sit in groups, of what
            mean size, how far from the group centre.
        debris: dark dots per image (not annotated); ``blebs``: dead-cell clusters per image.
        faint: unannotated faint flat cells per image (the carpet of unlabeled cells), of
            thickness ``faint_amp``.
        loose_frac: fraction of cells kept whole where they land on another (real overlaps);
            ``grow_frac``: fraction dilated by one pixel (touching masks overlap slightly).
        body_amp, nucleus_amp, fibre_amp, debris_amp: optical thickness of each part;
            ``membrane``: of the cell outline (relative to the body; negative: a bright line);
            ``texture``: granularity inside cells.
        halo: sigma of the halo (px); ``sharpness``: blur of the bodies (px); ``relief``: a
            slight directional shading; ``fill``: lifts cell interiors back toward the
            background level (real interiors are only a little darker).
        noise, light: background grain and uneven illumination (gray levels).
        gain: overall contrast; ``min_area``: smaller annotated pieces are dropped.
    """

    count: float
    radius: tuple[float, float]
    elongation: tuple[float, float] = (1.0, 1.5)
    irregularity: float = 0.15
    arms: tuple[int, int] = (0, 0)
    arm_length: tuple[float, float] = (1.0, 2.0)
    arm_width: float = 0.8
    flat_frac: float = 0.0
    flat_radius: tuple[float, float] = (20.0, 35.0)
    fibres: tuple[int, int] = (0, 0)
    fibre_length: tuple[float, float] = (20.0, 60.0)
    fibre_radial: bool = False
    fibre_wander: float = 0.1
    cluster_frac: float = 0.3
    cluster_size: float = 4.0
    cluster_spread: float = 15.0
    debris: int = 20
    blebs: int = 0
    faint: int = 0
    loose_frac: float = 0.02
    grow_frac: float = 0.4
    count_jitter: float = 0.25
    body_amp: float = 1.0
    nucleus_amp: float = 0.6
    fibre_amp: float = 0.5
    debris_amp: float = 2.5
    halo: float = 1.2
    sharpness: float = 0.5
    membrane: float = 0.6
    relief: float = 0.03
    texture: float = 0.3
    faint_amp: tuple[float, float] = (0.1, 0.25)
    noise: float = 1.5
    light: float = 1.0
    gain: float = 80.0
    fill: float = 0.0
    min_area: int = 30


CELL_STYLES: dict[str, CellStyle] = {
    "shsy5y": CellStyle(
        count=490,
        radius=(5.6, 9.5),
        elongation=(1.3, 3.2),
        irregularity=0.28,
        arms=(0, 2),
        arm_length=(0.8, 2.0),
        arm_width=0.7,
        fibres=(0, 2),
        fibre_length=(15.0, 50.0),
        cluster_frac=0.3,
        cluster_size=5.0,
        cluster_spread=20.0,
        debris=40,
        blebs=14,
        faint=300,
        faint_amp=(0.2, 0.45),
        loose_frac=0.02,
        grow_frac=0.8,
        body_amp=0.8,
        nucleus_amp=0.2,
        fibre_amp=0.5,
        noise=1.8,
        membrane=0.8,
        gain=75.0,
        fill=0.12,
        min_area=40,
    ),
    "cort": CellStyle(
        count=47,
        radius=(6.0, 9.5),
        elongation=(1.0, 1.7),
        irregularity=0.1,
        fibres=(8, 20),
        fibre_length=(20.0, 150.0),
        fibre_radial=True,
        fibre_wander=0.07,
        cluster_frac=0.75,
        cluster_size=3.5,
        cluster_spread=12.0,
        debris=320,
        blebs=2,
        faint=6,
        loose_frac=0.03,
        grow_frac=0.3,
        body_amp=2.0,
        nucleus_amp=0.4,
        fibre_amp=0.3,
        debris_amp=3.5,
        halo=2.0,
        membrane=-0.8,
        noise=3.0,
        gain=70.0,
        fill=0.07,
        min_area=60,
    ),
    "astro": CellStyle(
        count=115,
        radius=(6.5, 11.0),
        elongation=(1.8, 3.5),
        irregularity=0.18,
        arms=(1, 3),
        arm_length=(3.0, 8.0),
        arm_width=0.4,
        flat_frac=0.1,
        flat_radius=(20.0, 38.0),
        fibres=(0, 2),
        fibre_length=(30.0, 120.0),
        cluster_frac=0.6,
        cluster_size=5.0,
        cluster_spread=35.0,
        debris=30,
        blebs=6,
        faint=10,
        loose_frac=0.05,
        grow_frac=0.8,
        body_amp=1.35,
        nucleus_amp=0.5,
        fibre_amp=0.6,
        noise=0.8,
        light=0.5,
        gain=70.0,
        fill=0.09,
        min_area=80,
    ),
}
"""Competition cell types (``shsy5y``, ``cort``, ``astro``), tuned against the real fixtures."""

_LC = {"membrane": 0.5, "texture": 0.3, "halo": 1.8, "nucleus_amp": 0.35, "noise": 1.2, "fill": 0.05}
LIVECELL_STYLES: dict[str, CellStyle] = {
    "A172": CellStyle(**_LC, count=70, radius=(8, 13), elongation=(1.0, 1.8), irregularity=0.2, arms=(0, 1),
                      cluster_frac=0.2, debris=15, body_amp=1.2),
    "BT474": CellStyle(**_LC, count=220, radius=(7, 10), elongation=(1.0, 1.5), irregularity=0.12,
                       cluster_frac=0.8, cluster_size=12, cluster_spread=25, debris=15, body_amp=1.3),
    "BV2": CellStyle(**_LC, count=300, radius=(4.5, 7), elongation=(1.0, 1.4), irregularity=0.1,
                     cluster_frac=0.3, debris=30, body_amp=1.6, min_area=20),
    "Huh7": CellStyle(**_LC, count=90, radius=(12, 18), elongation=(1.0, 1.8), irregularity=0.2,
                      cluster_frac=0.7, cluster_size=8, cluster_spread=40, debris=15, body_amp=0.9),
    "MCF7": CellStyle(**_LC, count=200, radius=(8, 12), elongation=(1.0, 1.6), irregularity=0.15,
                      cluster_frac=0.8, cluster_size=10, cluster_spread=30, debris=15, body_amp=1.1),
    "SHSY5Y": CellStyle(**_LC, count=160, radius=(6, 10), elongation=(1.3, 3.0), irregularity=0.2, arms=(0, 2),
                        fibres=(0, 2), cluster_frac=0.4, debris=15, body_amp=1.0),
    "SkBr3": CellStyle(**_LC, count=260, radius=(7, 10), elongation=(1.0, 1.3), irregularity=0.1,
                       cluster_frac=0.7, cluster_size=6, cluster_spread=18, debris=15, body_amp=1.5),
    "SKOV3": CellStyle(**_LC, count=110, radius=(10, 15), elongation=(1.5, 3.0), irregularity=0.2, arms=(0, 2),
                       cluster_frac=0.4, debris=15, body_amp=1.0),
}  # fmt: skip
"""LIVECell's eight cell types, by their file-name prefix (coarse, for pretraining only)."""


# --------------------------------------------------------------------------------------------
# Instances and samples
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


@dataclass
class SyntheticSample:
    """One synthetic image and its annotated cells.

    Attributes:
        image: uint8 ``[H, W]``.
        cell_type: the style's name (``shsy5y``, ``cort``, ``astro`` or a LIVECell type).
        instances: the annotated cells, in the order they are written.
    """

    image: np.ndarray
    cell_type: str
    instances: list[Instance] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def __len__(self) -> int:
        return len(self.instances)

    def masks(self) -> np.ndarray:
        """All instances as a bool ``[N, H, W]`` stack."""
        out = np.zeros((len(self), self.height, self.width), dtype=bool)
        for i, inst in enumerate(self.instances):
            h, w = inst.mask.shape
            out[i, inst.y0 : inst.y0 + h, inst.x0 : inst.x0 + w] = inst.mask
        return out

    def rles(self) -> list[str]:
        """All instances as row-major RLE strings."""
        return [inst.rle(self.height, self.width) for inst in self.instances]


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _body_outline(
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


def _centreline(
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
    path = _centreline(rng, start, heading, length, wander=0.12)
    d = np.gradient(path, axis=0)
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1) / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-6)
    t = np.linspace(0.0, 1.0, len(path))[:, None]
    half = 0.5 * (base_width * (1.0 - t) ** 1.3 + 1.2)
    return np.concatenate([path + normal * half, (path - normal * half)[::-1]])


@dataclass
class _Cell:
    """A cell before carving: its outlines (global coords) and optical extras."""

    centre: np.ndarray
    outlines: list[np.ndarray]
    radius: float
    amp: float
    flat: bool
    fibres: list[np.ndarray]


def _make_cell(rng: np.random.Generator, style: CellStyle, centre: np.ndarray) -> _Cell:
    flat = bool(rng.random() < style.flat_frac)
    angle = rng.uniform(0.0, np.pi)
    if flat:
        radius = rng.uniform(*style.flat_radius)
        body = _body_outline(rng, radius, rng.uniform(1.2, 2.5), 0.22, angle, 40)
        outlines, amp = [centre + body], style.body_amp * rng.uniform(0.35, 0.55)
    else:
        radius = rng.uniform(*style.radius)
        elong = rng.uniform(*style.elongation)
        body = _body_outline(rng, radius, elong, style.irregularity, angle)
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
        fibres.append(_centreline(rng, start, h, length, wander=style.fibre_wander, step=6.0))
    return _Cell(centre, outlines, radius, amp, flat, fibres)


def _rasterise(outlines: list[np.ndarray], height: int, width: int, pad: int = 2) -> Instance | None:
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


def _centres(rng: np.random.Generator, n: int, style: CellStyle, height: int, width: int) -> np.ndarray:
    """Cell centres ``[n, 2]`` (x, y): a share in groups around random points, the rest uniform."""
    n_grouped = int(n * style.cluster_frac + 0.5)
    n_groups = max(1, int(n_grouped / style.cluster_size + 0.5))
    groups = rng.uniform((0, 0), (width, height), size=(n_groups, 2))
    which = rng.integers(0, n_groups, size=n_grouped)
    grouped = groups[which] + rng.normal(0.0, style.cluster_spread, size=(n_grouped, 2))
    loose = rng.uniform((0, 0), (width, height), size=(n - n_grouped, 2))
    pts = np.concatenate([grouped, loose])
    return np.clip(pts, (-5, -5), (width + 5, height + 5))


def _place_cells(
    rng: np.random.Generator, cells: list[_Cell], style: CellStyle, height: int, width: int
) -> tuple[list[Instance], list[_Cell]]:
    """Rasterise cells in order; a cell loses the pixels already taken (so neighbours touch
    rather than overlap), keeps its largest piece, and is dropped if too little is left. A
    few cells (``loose_frac``) keep their whole mask; ``grow_frac`` grow by a pixel afterwards,
    so touching masks overlap slightly, as hand-drawn polygons do."""
    taken = np.zeros((height, width), dtype=bool)
    kept: list[Instance] = []
    kept_cells: list[_Cell] = []
    for cell in cells:
        inst = _rasterise(cell.outlines, height, width)
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


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _add_crop(canvas: np.ndarray, inst: Instance, value: float) -> None:
    h, w = inst.mask.shape
    canvas[inst.y0 : inst.y0 + h, inst.x0 : inst.x0 + w] += inst.mask * np.float32(value)


def _outline_path(inst: Instance) -> list[np.ndarray]:
    """Smoothed outer contours of a mask in global pixel coordinates: float ``[P, 2]`` (x, y) each."""
    contours, _ = cv2.findContours(inst.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    paths = []
    for c in contours:
        pts = c.reshape(-1, 2).astype(np.float32)
        if len(pts) >= 5:  # circular moving average over 5 points: no pixel staircase
            pts = sum(np.roll(pts, k, axis=0) for k in (-2, -1, 0, 1, 2)) / 5.0
        paths.append(pts + np.array([inst.x0, inst.y0], dtype=np.float32))
    return paths


def _draw_paths(canvas: np.ndarray, paths: list[np.ndarray], amps: list[float], closed: bool) -> None:
    """Add anti-aliased one-pixel lines along ``paths`` (float ``[P, 2]`` each) to a float32 canvas.

    ``amps`` (one per path) may be negative (a line that lowers the thickness: a bright line).
    """
    for sign in (1.0, -1.0):
        chosen = [(p, abs(a)) for p, a in zip(paths, amps, strict=True) if a * sign > 0]
        if not chosen:
            continue
        top = max(a for _, a in chosen)
        layer = np.zeros(canvas.shape, dtype=np.uint8)
        for path, amp in chosen:
            pts = np.round(path * 8).astype(np.int32)
            cv2.polylines(layer, [pts], closed, max(1, int(255 * amp / top + 0.5)), 1, cv2.LINE_AA, 3)
        canvas += layer.astype(np.float32) * np.float32(sign * top / 255.0)


def _draw_dots(canvas: np.ndarray, centres: np.ndarray, radii: np.ndarray, amps: np.ndarray) -> None:
    """Add round discs to a float32 ``[H, W]`` canvas, anti-aliased over one pixel of their edge.

    Args:
        centres: float ``[K, 2]`` (x, y); radii: float ``[K]``; amps: float ``[K]`` disc heights.
    """
    height, width = canvas.shape
    for (cx, cy), r, a in zip(centres, radii, amps, strict=True):
        x0, y0 = max(int(cx - r - 1), 0), max(int(cy - r - 1), 0)
        x1, y1 = min(int(cx + r + 2), width), min(int(cy + r + 2), height)
        if x1 <= x0 or y1 <= y0:
            continue
        ys, xs = np.ogrid[y0:y1, x0:x1]
        dist = np.sqrt((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2)
        canvas[y0:y1, x0:x1] += np.clip(r + 0.5 - dist, 0.0, 1.0).astype(np.float32) * np.float32(a)


def _background(rng: np.random.Generator, height: int, width: int, noise: float, light: float) -> np.ndarray:
    """Uneven illumination (a few gray levels over the field) plus fine grain: float32 ``[H, W]``."""
    coarse = rng.normal(0.0, 1.0, size=(4, 5)).astype(np.float32)
    shading = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC) * light
    grain = rng.standard_normal((height, width), dtype=np.float32) * noise
    grain = cv2.GaussianBlur(grain, (0, 0), 0.5) * 1.4
    ripple_y = np.sin(np.arange(height, dtype=np.float32) * 2.1 + rng.uniform(0, 6.3))[:, None]
    ripple_x = np.sin(np.arange(width, dtype=np.float32) * 2.3 + rng.uniform(0, 6.3))[None, :]
    return shading + grain + 0.3 * noise * ripple_y * ripple_x


def _render(
    rng: np.random.Generator,
    style: CellStyle,
    instances: list[Instance],
    cells: list[_Cell],
    height: int,
    width: int,
) -> np.ndarray:
    """Phase-contrast-like rendering of the placed cells: uint8 ``[H, W]``, mean 128.

    Everything adds to an optical-thickness map ``T``; the image is ``gain * (blur(T) - T)``:
    inside an object's edge it is dark, just outside it lights up (the halo), and the inside
    of a large flat object returns to the background level.
    """
    scale = height * width / _REF_AREA
    thick = np.zeros((height, width), dtype=np.float32)  # smooth parts (bodies)
    edges = np.zeros((height, width), dtype=np.float32)  # crisp parts (membranes, fibres, dots)
    membranes: list[np.ndarray] = []
    membrane_amps: list[float] = []
    # Unannotated faint flat cells underneath everything.
    n_faint = rng.poisson(style.faint * scale)
    for c in _centres(rng, n_faint, style, height, width):
        body = _body_outline(rng, rng.uniform(10, 24), rng.uniform(1.0, 2.5), 0.3, rng.uniform(0, np.pi))
        inst = _rasterise([c + body], height, width)
        if inst is not None:
            amp = rng.uniform(*style.faint_amp)
            _add_crop(thick, inst, amp)
            membranes.append(c + body)
            membrane_amps.append(amp * style.membrane)
    # Annotated cells: body with granular texture, nucleus.
    cover = np.zeros((height, width), dtype=np.float32)
    nuclei, nuc_r, nuc_a = [], [], []
    for inst, cell in zip(instances, cells, strict=True):
        _add_crop(cover, inst, cell.amp)
        for path in _outline_path(inst):
            membranes.append(path)
            membrane_amps.append(cell.amp * style.membrane)
        if not cell.flat:
            nuclei.append(cell.centre + rng.normal(0, cell.radius * 0.15, 2))
            nuc_r.append(cell.radius * rng.uniform(0.35, 0.55))
            nuc_a.append(style.nucleus_amp * rng.uniform(0.6, 1.2))
    grains = rng.standard_normal((height, width), dtype=np.float32)
    grains = cv2.GaussianBlur(grains, (0, 0), 1.0)
    thick += cover * (1.0 + style.texture * grains)
    _draw_paths(edges, membranes, membrane_amps, closed=True)
    if nuclei:
        _draw_dots(thick, np.array(nuclei), np.array(nuc_r), np.array(nuc_a))
    # Thin processes (not in the masks), plus long ones crossing the field for radial styles.
    fibres = [f for cell in cells for f in cell.fibres]
    if style.fibre_radial:
        for _ in range(rng.poisson(len(fibres) * 0.1)):
            start = rng.uniform((0, 0), (width, height))
            fibres.append(
                _centreline(rng, start, rng.uniform(0, 2 * np.pi), rng.uniform(150, 400), 0.04, 8.0)
            )
    _draw_paths(edges, fibres, list(style.fibre_amp * rng.uniform(0.4, 1.0, len(fibres))), closed=False)
    # Debris dots and dead-cell bleb clusters (dark, bright-rimmed).
    n_debris = rng.poisson(style.debris * scale)
    debris = rng.uniform((0, 0), (width, height), size=(n_debris, 2))
    radii = rng.uniform(1.3, 2.8, n_debris)
    amps = style.debris_amp * rng.uniform(0.5, 1.0, n_debris)
    n_blebs = rng.poisson(style.blebs * scale)
    if n_blebs:
        sizes = rng.integers(3, 12, n_blebs)
        centres = rng.uniform((0, 0), (width, height), size=(n_blebs, 2))
        bleb = np.repeat(centres, sizes, axis=0) + rng.normal(0, 4.5, size=(int(sizes.sum()), 2))
        debris = np.concatenate([debris, bleb])
        radii = np.concatenate([radii, rng.uniform(2.0, 3.5, len(bleb))])
        amps = np.concatenate([amps, style.debris_amp * rng.uniform(0.6, 1.0, len(bleb))])
    # A thinner-than-background ring around each dot: the bright rim dead cells and debris show.
    _draw_dots(edges, debris, radii + 1.3, -0.45 * amps)
    _draw_dots(edges, debris, radii, 1.45 * amps)
    # Phase contrast: a thick object darkens, its surroundings light up (halo).
    thick = cv2.GaussianBlur(thick, (0, 0), style.sharpness) + cv2.GaussianBlur(edges, (0, 0), 0.35)
    halo = cv2.GaussianBlur(thick, (0, 0), style.halo)
    relief = cv2.Sobel(thick, cv2.CV_32F, 1, 0) + cv2.Sobel(thick, cv2.CV_32F, 0, 1)
    image = (halo - thick + style.relief * relief + style.fill * cover) * np.float32(style.gain)
    image += _background(rng, height, width, style.noise, style.light)
    image += np.float32(128.0 - float(image.mean()))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def synth_image(
    cell_type: str, height: int = 520, width: int = 704, rng: np.random.Generator | int | None = 0
) -> SyntheticSample:
    """Generate one synthetic image of a cell type with its instance masks.

    Args:
        cell_type: a key of :data:`CELL_STYLES` or :data:`LIVECELL_STYLES`.
        height, width: image size; the number of cells scales with the area, their size does not.
        rng: a generator or a seed.

    Returns:
        a :class:`SyntheticSample` (image uint8 ``[H, W]``, instances as crops).
    """
    style = CELL_STYLES.get(cell_type) or LIVECELL_STYLES.get(cell_type)
    if style is None:
        raise ValueError(
            f"unknown cell type {cell_type!r}; expected one of {', '.join([*CELL_STYLES, *LIVECELL_STYLES])}"
        )
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    scale = height * width / _REF_AREA
    mean = style.count * scale * rng.uniform(1 - style.count_jitter, 1 + style.count_jitter)
    n = max(1, rng.poisson(mean))
    centres = _centres(rng, n, style, height, width)
    cells = [_make_cell(rng, style, c) for c in centres]
    instances, cells = _place_cells(rng, cells, style, height, width)
    image = _render(rng, style, instances, cells, height, width)
    return SyntheticSample(image, cell_type, instances)


# --------------------------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------------------------

_SAMPLE_PREFIX = {
    "shsy5y": ("shsy5y[diff]",),
    "cort": ("cort[oka-high]", "cort[oka-low]", "cort[pre-treat]", "cort[debris]"),
    "astro": ("astros[cereb]", "astro[hippo]"),
}


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"HxW"`` (e.g. ``"520x704"``) into ``(height, width)``.

    Raises:
        DataError: not two positive integers joined by ``x``, or a side below 32 pixels.
    """
    parts = str(text).lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise DataError(f"--size must be HxW with two integers, e.g. 520x704; got {text!r}")
    height, width = int(parts[0]), int(parts[1])
    if height < _MIN_SIZE or width < _MIN_SIZE:
        raise DataError(f"--size {text!r}: height and width must be at least {_MIN_SIZE} pixels")
    return height, width


def _image_ids(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct 12-character lowercase hex ids."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        for v in rng.integers(0, 1 << 48, size=n - len(ids), dtype=np.int64):
            s = f"{int(v):012x}"
            if s not in seen:
                seen.add(s)
                ids.append(s)
    return ids


def _train_meta(rng: np.random.Generator, cell_type: str, index: int, previous: list[dict]) -> dict:
    """Plausible plate metadata; about a third of the images share a well with an earlier one,
    and every seventh image (the 4th, 11th, ...) has an empty ``sample_id`` (as some real rows do)."""
    same = [m for m in previous if m["cell_type"] == cell_type and m["sample_id"]]
    if same and rng.random() < 0.35:
        base = dict(same[int(rng.integers(len(same)))])
    else:
        prefix = _SAMPLE_PREFIX[cell_type][int(rng.integers(len(_SAMPLE_PREFIX[cell_type])))]
        well = f"{'ABCDEFGH'[int(rng.integers(8))]}{int(rng.integers(1, 13))}-{int(rng.integers(1, 5))}"
        vessel = int(rng.integers(300, 800))
        date = np.datetime64("2019-06-01") + int(rng.integers(0, 540))
        base = {
            "sample_id": f"{prefix}_{well}_Vessel-{vessel}_Ph_{int(rng.integers(1, 5))}",
            "sample_date": str(date),
        }
    minutes = int(rng.integers(1, 48)) * 30
    hours, mins = divmod(minutes, 60)
    meta = {
        "cell_type": cell_type,
        "plate_time": f"{hours:02d}h{mins:02d}m00s",
        "sample_date": base["sample_date"],
        "sample_id": base["sample_id"] if index % 7 != 3 else "",
        "elapsed_timedelta": f"{hours // 24} days {hours % 24:02d}:{mins:02d}:00",
    }
    previous.append({**meta, "sample_id": base["sample_id"]})
    return meta


def _livecell_splits(n: int) -> list[str]:
    """Split names for ``n`` LIVECell images: about 70/10/20 %, each split non-empty once ``n >= 3``."""
    if n <= 0:
        return []
    if n < 3:
        return ["train", "val"][:n]
    n_val = max(1, round(0.1 * n))
    n_test = max(1, round(0.2 * n))
    return ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test


def _livecell_name(rng: np.random.Generator, cell_type: str) -> str:
    well = f"{'ABCDEFGH'[int(rng.integers(8))]}{int(rng.integers(1, 13))}"
    hours = int(rng.integers(0, 25)) * 4
    return f"{cell_type}_Phase_{well}_{int(rng.integers(1, 5))}_{hours // 24:02d}d{hours % 24:02d}h00m_{int(rng.integers(1, 5))}.tif"


def _write_image(path: Path, image: np.ndarray) -> None:
    """Write a uint8 ``[H, W]`` image (PNG or TIFF by suffix)."""
    if not cv2.imwrite(str(path), image):
        raise DataError(f"{path}: could not write image")


def _progress(total: int) -> Any:
    """A tqdm bar over images (silent when stderr is not a terminal), or ``None`` without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="cellmask synth", unit="img", disable=None, file=sys.stderr)


@dataclass(frozen=True)
class _Layout:
    """Where every part of the competition layout lives under one root."""

    root: Path

    @property
    def folders(self) -> dict[str, Path]:
        lc = self.root / "LIVECell_dataset_2021"
        return {
            "train": self.root / "train",
            "unlabeled": self.root / "train_semi_supervised",
            "test": self.root / "test",
            "lc_train": lc / "images" / "livecell_train_val_images",
            "lc_val": lc / "images" / "livecell_train_val_images",
            "lc_test": lc / "images" / "livecell_test_images",
            "lc_ann": lc / "annotations" / "LIVECell",
        }

    def coco(self, split: str) -> Path:
        return self.folders["lc_ann"] / f"livecell_coco_{split}.json"


def _prepare(layout: _Layout) -> None:
    """Create the folders; clear the images of an earlier synthetic run so the layout stays exact.

    Raises:
        DataError: the root is a file, or it already holds images that ``cellmask synth`` did
            not write (e.g. the real competition data): those are never deleted.
    """
    root = layout.root
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: exists and is not a folder")
    stale = [
        p
        for d in set(layout.folders.values())
        if d.is_dir()
        for p in d.iterdir()
        if p.is_file() and p.suffix.lower() in (".png", ".tif", ".json")
    ]
    if stale:
        try:
            ours = json.loads(layout.coco("train").read_text())["info"]["description"] == _COCO_DESCRIPTION
        except (OSError, ValueError, KeyError, TypeError):
            ours = False
        if not ours:
            raise DataError(
                f"{root}: already holds image or annotation files not written by `cellmask synth`; "
                "choose an empty or new folder"
            )
        for p in stale:
            p.unlink()
    for d in layout.folders.values():
        d.mkdir(parents=True, exist_ok=True)


def _write_train(layout: _Layout, ids: list[str], seed: int, size: tuple[int, int], bar: Any) -> int:
    """Annotated images and ``train.csv``; cell types cycle shsy5y, cort, astro. Returns #instances."""
    height, width = size
    meta_rng = np.random.default_rng([seed, 98])
    previous: list[dict] = []
    n_instances = 0
    with (layout.root / "train.csv").open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(TRAIN_COLUMNS)
        for i, image_id in enumerate(ids):
            cell_type = COMPETITION_TYPES[i % 3]
            sample = synth_image(cell_type, height, width, np.random.default_rng([seed, 0, i]))
            meta = _train_meta(meta_rng, cell_type, i, previous)
            _write_image(layout.folders["train"] / f"{image_id}.png", sample.image)
            tail = [width, height, cell_type, *(meta[k] for k in TRAIN_COLUMNS[5:])]
            writer.writerows([image_id, rle, *tail] for rle in sample.rles())
            n_instances += len(sample)
            if bar is not None:
                bar.update()
    return n_instances


def _write_unannotated(
    folder: Path,
    ids: list[str],
    types: tuple[str, ...],
    stream: int,
    seed: int,
    size: tuple[int, int],
    bar: Any,
) -> None:
    """Images without annotations (``train_semi_supervised/``, ``test/``), types cycling ``types``."""
    for i, image_id in enumerate(ids):
        sample = synth_image(types[i % len(types)], *size, np.random.default_rng([seed, stream, i]))
        _write_image(folder / f"{image_id}.png", sample.image)
        if bar is not None:
            bar.update()


def _coco_annotation(ann_id: int, image_id: int, inst: Instance) -> dict | None:
    """One LIVECell-style COCO annotation (polygons, xywh box in pixel edges); ``None`` if degenerate."""
    polygons = inst.polygons()
    if not polygons:
        return None
    x0, y0, x1, y1 = (float(v) for v in inst.box())
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "segmentation": polygons,
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": float(inst.area),
        "iscrowd": 0,
    }


def _write_livecell(layout: _Layout, n: int, seed: int, size: tuple[int, int], bar: Any) -> int:
    """LIVECell images (types cycle over :data:`LIVECELL_TYPES`) and the three COCO files, with
    ``annotations`` a dict keyed by the id as a string, as LIVECell ships them. Returns #instances."""
    name_rng = np.random.default_rng([seed, 97])
    coco: dict[str, dict] = {s: {"images": [], "annotations": {}} for s in ("train", "val", "test")}
    used: set[str] = set()
    ann_id = 1
    for i, split in enumerate(_livecell_splits(n)):
        cell_type = LIVECELL_TYPES[i % len(LIVECELL_TYPES)]
        name = _livecell_name(name_rng, cell_type)
        while name in used:
            name = _livecell_name(name_rng, cell_type)
        used.add(name)
        sample = synth_image(cell_type, *size, np.random.default_rng([seed, 3, i]))
        _write_image(layout.folders[f"lc_{split}"] / name, sample.image)
        image_id = i + 1
        coco[split]["images"].append({"id": image_id, "file_name": name, "width": size[1], "height": size[0]})
        for inst in sample.instances:
            ann = _coco_annotation(ann_id, image_id, inst)
            if ann is not None:
                coco[split]["annotations"][str(ann_id)] = ann
                ann_id += 1
        if bar is not None:
            bar.update()
    for split, data in coco.items():
        doc = {
            "info": {"description": _COCO_DESCRIPTION, "version": "1.0"},
            "licenses": [],
            "images": data["images"],
            "annotations": data["annotations"],
            "categories": [{"id": 1, "name": "cell", "supercategory": "cell"}],
        }
        layout.coco(split).write_text(json.dumps(doc, separators=(",", ":")))
    return ann_id - 1


def write_dataset(
    out: str | Path,
    n_train: int = 24,
    n_unlabeled: int = 6,
    n_test: int = 3,
    n_livecell: int = 8,
    seed: int = 0,
    size: tuple[int, int] = (520, 704),
) -> dict[str, int]:
    """Write a synthetic dataset in the competition's layout under ``out`` (see module docstring).

    Each image has its own random stream derived from ``(seed, split, index)``, so asking for
    more test images does not change the training images. Re-running into the same folder
    replaces the earlier synthetic dataset; a folder holding other data is refused.

    Returns:
        counts: ``{"train", "instances", "unlabeled", "test", "livecell", "livecell_instances"}``.

    Raises:
        DataError: a negative count, a bad size, or an output folder that holds other data.
    """
    counts = {"train": n_train, "unlabeled": n_unlabeled, "test": n_test, "livecell": n_livecell}
    for name, n in counts.items():
        if n < 0:
            raise DataError(f"--{name} must be >= 0, got {n}")
    if min(size) < _MIN_SIZE:
        raise DataError(f"image size {size[0]}x{size[1]} is too small: both sides must be >= {_MIN_SIZE}")
    layout = _Layout(Path(out))
    _prepare(layout)
    ids = _image_ids(np.random.default_rng([seed, 99]), n_train + n_unlabeled + n_test)
    train_ids, unl_ids, test_ids = (
        ids[:n_train],
        ids[n_train : n_train + n_unlabeled],
        ids[n_train + n_unlabeled :],
    )
    bar = _progress(sum(counts.values()))
    try:
        counts["instances"] = _write_train(layout, train_ids, seed, size, bar)
        # Unlabeled and test images mix the types in other orders than train.
        _write_unannotated(
            layout.folders["unlabeled"], unl_ids, ("cort", "astro", "shsy5y"), 1, seed, size, bar
        )
        _write_unannotated(layout.folders["test"], test_ids, ("astro", "shsy5y", "cort"), 2, seed, size, bar)
        with (layout.root / "sample_submission.csv").open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["id", "predicted"])
            writer.writerows([image_id, ""] for image_id in test_ids)
        counts["livecell_instances"] = _write_livecell(layout, n_livecell, seed, size, bar)
    finally:
        if bar is not None:
            bar.close()
    return counts


def cli_synth(args) -> int:
    """``cellmask synth OUT [--train N] [--unlabeled N] [--test N] [--livecell N] [--seed S] [--size HxW]``."""
    size = parse_size(args.size)
    counts = write_dataset(
        args.out,
        n_train=args.train,
        n_unlabeled=args.unlabeled,
        n_test=args.test,
        n_livecell=args.livecell,
        seed=args.seed,
        size=size,
    )
    print(
        f"wrote {counts['train']} train images ({counts['instances']} instances), "
        f"{counts['unlabeled']} unlabeled, {counts['test']} test, {counts['livecell']} LIVECell images "
        f"({counts['livecell_instances']} instances) to {args.out}"
    )
    return 0
