"""Rendering: placed cells -> a phase-contrast-like 8-bit image, and :func:`synth_image`.

Each cell adds to an optical-thickness map, and the image is a high-pass of that map (dark
rims inside objects, bright halos around them) over a textured, unevenly lit gray background.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from cellmask.data.synthetic.cells import (
    Cell,
    Instance,
    body_outline,
    cell_centres,
    centreline,
    make_cell,
    place_cells,
    rasterise,
)
from cellmask.data.synthetic.styles import CELL_STYLES, LIVECELL_STYLES, CellStyle

__all__ = ["SyntheticSample", "synth_image"]

_REF_AREA = 520 * 704  # counts in CellStyle are per image of the competition's size


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


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
    cells: list[Cell],
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
    for c in cell_centres(rng, n_faint, style, height, width):
        body = body_outline(rng, rng.uniform(10, 24), rng.uniform(1.0, 2.5), 0.3, rng.uniform(0, np.pi))
        inst = rasterise([c + body], height, width)
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
            fibres.append(centreline(rng, start, rng.uniform(0, 2 * np.pi), rng.uniform(150, 400), 0.04, 8.0))
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
    centres = cell_centres(rng, n, style, height, width)
    cells = [make_cell(rng, style, c) for c in centres]
    instances, cells = place_cells(rng, cells, style, height, width)
    image = _render(rng, style, instances, cells, height, width)
    return SyntheticSample(image, cell_type, instances)
