"""What the segmenter's square RoIAlign crop does to a cell's mask, per cell type: every truth
mask cropped at its tight box to ``S x S`` (as the segmenter sees its target), pasted back at the
box and thresholded at 0.5 (as the pipeline pastes a prediction), against the mask itself. The
mean IoU is the ceiling a perfect segmenter reaches at that crop size: where it is near 1 the
crop is not what limits a type (astrocytes are long and branching: the question of issue 24).

    .venv/bin/python benchmarks/bench_crop_roundtrip.py [--data ../shared/sartorius] [--images 6]

Without ``--data`` it reads the real fixture images (2 per type).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cellmask.data.crops import crop_masks, instance_pixels, tight_boxes
from cellmask.data.sartorius import read_train_csv
from cellmask.models.segmenter import paste_masks

ROOT = Path(__file__).resolve().parents[1]
SIZES = (64, 96, 128, 192)


def roundtrip_iou(record, size: int) -> list[float]:
    """The IoU of each instance's mask after a crop at ``size`` and a paste back."""
    pixels = [p for p in (instance_pixels(record, i) for i in range(len(record))) if len(p[0]) >= 4]
    if not pixels:
        return []
    boxes = tight_boxes(pixels)
    probs = crop_masks(pixels, boxes, size, 2).float()
    pasted, _ = paste_masks(probs, boxes, (record.height, record.width), 0.5, dense=False)
    out = []
    for i, (ys, xs) in enumerate(pixels):
        truth = np.zeros((record.height, record.width), bool)
        truth[ys, xs] = True
        mask = pasted.mask(i).numpy().astype(bool)
        out.append(float((truth & mask).sum() / max((truth | mask).sum(), 1)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / "tests" / "fixtures" / "sartorius_real")
    p.add_argument("--images", type=int, default=6, help="images per cell type (default 6)")
    args = p.parse_args()
    torch.set_num_threads(1)
    records = read_train_csv(args.data / "train.csv", args.data / "train")
    print(f"crop -> paste round trip of the truth masks, {args.data}, up to {args.images} images per type")
    print(
        f"{'cell type':10s} {'cells':>6s} "
        + " ".join(f"{'S=' + str(s):>8s}" for s in SIZES)
        + "   box side p50/p90"
    )
    for kind in ("shsy5y", "cort", "astro"):
        chosen = [r for r in records if r.cell_type == kind][: args.images]
        sides = np.concatenate(
            [
                np.maximum(
                    *np.split(np.diff(np.asarray(r.boxes).reshape(-1, 2, 2), axis=1)[:, 0], 2, 1)
                ).ravel()
                for r in chosen
            ]
        )
        means = [np.mean([v for r in chosen for v in roundtrip_iou(r, s)]) for s in SIZES]
        cells = sum(len(r) for r in chosen)
        print(
            f"{kind:10s} {cells:6d} "
            + " ".join(f"{m:8.3f}" for m in means)
            + f"   {np.percentile(sides, 50):.0f}/{np.percentile(sides, 90):.0f} px"
        )


if __name__ == "__main__":
    main()
