"""Regenerate ``docs/synthetic_vs_real.png``: real fixture images next to synthetic ones.

Rows: shsy5y, cort, astro (competition), then LIVECell. Columns: real image, real with its
truth masks, synthetic image, synthetic with its masks. Panels are crops at full resolution
(one pixel per pixel), so cell shapes and textures compare fairly.

Run from the repository root::

    .venv/bin/python docs/make_figures.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cellmask.data.images import read_image
from cellmask.data.sartorius import read_train_csv
from cellmask.data.synthetic import synth_image
from cellmask.plot import overlay_rgb

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "sartorius_real"
OUT = ROOT / "docs" / "synthetic_vs_real.png"

REAL_IDS = {"shsy5y": "0030fd0e6378", "cort": "026b3c2c4b32", "astro": "0140b3c8f445"}
LIVECELL_REAL = "SkBr3_Phase_H3_2_02d00h00m_1.tif"
CROP = (100, 150, 260, 352)  # y, x, height, width: a quarter of a 520x704 image


def _crop(a: np.ndarray) -> np.ndarray:
    y, x, h, w = CROP
    return a[y : y + h, x : x + w]


def build_figure(seed: int = 1) -> Figure:
    """The comparison figure (rows per cell type, four columns)."""
    records = {r.image_id: r for r in read_train_csv(FIXTURE / "train.csv", FIXTURE / "train")}
    rows: list[tuple[str, list[tuple[str, np.ndarray]]]] = []
    for cell_type, image_id in REAL_IDS.items():
        rec = records[image_id]
        real = read_image(rec.path, (rec.height, rec.width))
        syn = synth_image(cell_type, rec.height, rec.width, rng=seed)
        rows.append(
            (
                cell_type,
                [
                    (f"real {cell_type} ({len(rec)} masks)", _crop(real)),
                    ("real + truth", _crop(overlay_rgb(real, rec.masks()))),
                    (f"synthetic {cell_type} ({len(syn)} masks)", _crop(syn.image)),
                    ("synthetic + masks", _crop(overlay_rgb(syn.image, syn.masks()))),
                ],
            )
        )
    real_lc = read_image(FIXTURE / "livecell" / LIVECELL_REAL)
    syn_lc = synth_image("SkBr3", *real_lc.shape, rng=seed)
    syn_a172 = synth_image("A172", *real_lc.shape, rng=seed)
    rows.append(
        (
            "LIVECell",
            [
                ("real LIVECell SkBr3 (no masks shipped)", _crop(real_lc)),
                (
                    f"synthetic A172 + masks ({len(syn_a172)})",
                    _crop(overlay_rgb(syn_a172.image, syn_a172.masks())),
                ),
                (f"synthetic SkBr3 ({len(syn_lc)} masks)", _crop(syn_lc.image)),
                ("synthetic SkBr3 + masks", _crop(overlay_rgb(syn_lc.image, syn_lc.masks()))),
            ],
        )
    )
    _, _, h, w = CROP
    dpi, title_px, gap_px = 100, 22, 6
    n_rows, n_cols = len(rows), 4
    fig_w = n_cols * w + (n_cols - 1) * gap_px
    fig_h = n_rows * (h + title_px) + (n_rows - 1) * gap_px
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    for r, (_, panels) in enumerate(rows):
        for c, (title, pixels) in enumerate(panels):
            left = c * (w + gap_px) / fig_w
            bottom = 1.0 - ((r + 1) * (h + title_px) + r * gap_px) / fig_h
            ax = fig.add_axes((left, bottom, w / fig_w, h / fig_h))
            ax.imshow(pixels, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(title, fontsize=10, pad=3)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output PNG (default {OUT})")
    parser.add_argument("--seed", type=int, default=1, help="seed of the synthetic images")
    args = parser.parse_args(argv)
    fig = build_figure(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=fig.dpi, pil_kwargs={"optimize": True})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
