"""How each synthetic cell type looks: :class:`CellStyle` and the per-type tables.

Competition types (:data:`CELL_STYLES`: ``shsy5y``, ``cort``, ``astro``) were tuned against the
real fixtures; LIVECell's eight types (:data:`LIVECELL_STYLES`) are coarse, for pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CELL_STYLES", "COMPETITION_TYPES", "LIVECELL_STYLES", "LIVECELL_TYPES", "CellStyle"]

COMPETITION_TYPES: tuple[str, ...] = ("shsy5y", "cort", "astro")
LIVECELL_TYPES: tuple[str, ...] = ("A172", "BT474", "BV2", "Huh7", "MCF7", "SHSY5Y", "SkBr3", "SKOV3")


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
