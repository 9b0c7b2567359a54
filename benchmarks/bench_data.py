"""Benchmark: detector data loading, lazy mask decoding and LIVECell polygon rasterisation.

1. ``DetectionDataset`` items/s with the paper augmentations (``configs/base.yaml``'s
   ``augment``, the authors' values) on the 6 real fixture images (36-496 cells each):
   *before*, every sample decodes every instance mask into label layers, warps them and takes
   the boxes from them (the pipeline wrapped in a plain callable, which is how the dataset
   treats any transform that cannot tell what it will draw); *after*, the pipeline draws the
   sample's plan first and masks are decoded only for rotated samples (p 0.4 here). Both runs
   see the same seeds, i.e. the same draws; the boxes are checked to be identical. A second
   line does the same with flips only (the ``demo`` profile's augmentations).
2. LIVECell polygons: the outlines of all 1167 real cells (as polygons with LIVECell-like
   2-decimal coordinates) on one 520x704 image, rasterised per instance the old way
   (pycocotools full-frame mask, then ``np.flatnonzero``) and the new way
   (:func:`cellmask.data.polygons.polygon_indices`: run lengths to indices, no ``H x W`` array);
   the pixels are checked to be identical. Then ``DetectionDataset`` items/s on that
   1167-instance polygon image, before (full-frame rasterisation, decode always) and after.

One torch and one OpenCV thread; before and after take turns, best of ``--repeats``::

    .venv/bin/python benchmarks/bench_data.py [--passes 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from cellmask.config import load_config
from cellmask.data import datasets as datasets_module
from cellmask.data.datasets import DetectionDataset
from cellmask.data.polygons import polygon_indices
from cellmask.data.records import ImageRecord
from cellmask.data.sartorius import read_train_csv
from cellmask.data.transforms import build_transforms

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "fixtures" / "sartorius_real"


def full_frame_indices(polygons, height: int, width: int) -> np.ndarray:
    """The old rasterisation: a full ``H x W`` pycocotools mask per instance, then flatnonzero."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return np.flatnonzero(mask_utils.decode(mask_utils.merge(rles)))


def best_of(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall time of each function, the functions taking turns ``repeats`` times."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def run_dataset(dataset: DetectionDataset, passes: int) -> list[torch.Tensor]:
    """Every item ``passes`` times, item ``i`` of pass ``e`` seeded with ``1000 * e + i``."""
    boxes = []
    for e in range(passes):
        for i in range(len(dataset)):
            torch.manual_seed(1000 * e + i)
            boxes.append(dataset[i][1]["boxes"])
    return boxes


def compare_datasets(
    name: str, records: list[ImageRecord], augment: dict, passes: int, repeats: int, patch_before=None
) -> None:
    """Print items/s of the decode-always and the lazy dataset (same draws, identical boxes)."""
    pipeline = build_transforms(augment, train=True)
    after = DetectionDataset(records, pipeline, image_cache=True)
    before = DetectionDataset(records, lambda sample: pipeline(sample), image_cache=True)
    for ds in (before, after):  # warm the image caches
        for i in range(len(ds)):
            ds.source.read(i)
    original = datasets_module.instance_indices

    def run_before():
        if patch_before is not None:
            datasets_module.instance_indices = patch_before
        try:
            return run_dataset(before, passes)
        finally:
            datasets_module.instance_indices = original

    a, b = run_before(), run_dataset(after, passes)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), f"{name}: boxes differ"
    items = passes * len(records)
    t_before, t_after = best_of([run_before, lambda: run_dataset(after, passes)], repeats)
    rotated = 0
    for e in range(passes):
        for i in range(len(records)):
            torch.manual_seed(1000 * e + i)
            rotated += pipeline.plan().rotates
    print(
        f"{name}: before {items / t_before:6.1f} items/s, after {items / t_after:6.1f} items/s, "
        f"speed-up {t_before / t_after:4.2f}x ({items} items, {rotated} rotated, identical boxes)"
    )


def livecell_like(records: list[ImageRecord]) -> ImageRecord:
    """One 520x704 polygon record holding the outlines of every real cell (LIVECell-like); its
    boxes are the tight boxes of the rasterised polygons (LIVECell's reader keeps the COCO
    boxes), so that both datasets must give identical boxes."""
    rng = np.random.default_rng(0)
    polygons, boxes = [], []
    for record in records:
        for i in range(len(record)):
            contours, _ = cv2.findContours(
                record.mask(i).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
            )
            polys = [
                (c.reshape(-1) + rng.uniform(-0.5, 0.5, c.size)).round(2) for c in contours if len(c) >= 3
            ]
            if not polys:
                continue
            polygons.append([p.tolist() for p in polys])
            ys, xs = np.divmod(polygon_indices(polygons[-1], record.height, record.width), record.width)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    image = records[0]
    return ImageRecord(
        image_id="livecell_like",
        path=image.path,
        height=image.height,
        width=image.width,
        cell_type="shsy5y",
        boxes=np.asarray(boxes, dtype=np.float32),
        labels=np.full(len(boxes), 6, dtype=np.int64),
        segmentations=polygons,
        seg_format="polygon",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=5, help="passes over the images per timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    run = (args.passes, args.repeats)
    records = read_train_csv(REAL / "train.csv")
    paper = load_config(ROOT / "configs" / "base.yaml")["augment"]
    demo = load_config(ROOT / "configs" / "base.yaml", "demo")["augment"]
    print(f"6 real images, {sum(len(r) for r in records)} cells; torch/OpenCV threads: 1")
    print("before: every sample decodes all masks; after: only rotated samples (the plan is drawn first)")
    compare_datasets("paper augmentations (shift-scale-rotate p 0.4, flip, ...)", records, paper, *run)
    compare_datasets("flips only (the demo profile's augmentations)           ", records, demo, *run)

    record = livecell_like(records)
    n, h, w = len(record), record.height, record.width
    polys = record.segmentations
    old = [full_frame_indices(p, h, w) for p in polys]
    new = [polygon_indices(p, h, w) for p in polys]
    assert all(np.array_equal(a, b) for a, b in zip(old, new, strict=True)), "pixels differ"
    t_old, t_new = best_of(
        [
            lambda: [full_frame_indices(p, h, w) for p in polys],
            lambda: [polygon_indices(p, h, w) for p in polys],
        ],
        args.repeats,
    )
    print(
        f"LIVECell-like polygons ({n} instances, {h}x{w}): full frame {t_old * 1e3:7.1f} ms/image, "
        f"run lengths {t_new * 1e3:6.1f} ms/image, speed-up {t_old / t_new:5.1f}x (identical pixels)"
    )
    name = f"LIVECell-like image ({n} polygons), paper augmentations"
    compare_datasets(name, [record], paper, 2 * args.passes, args.repeats, full_frame_indices_of)


def full_frame_indices_of(record: ImageRecord, i: int) -> np.ndarray:
    """``instance_indices`` as it was: polygons through a full-frame mask."""
    if record.seg_format == "polygon":
        return full_frame_indices(record.segmentations[i], record.height, record.width)
    return record.indices(i)


if __name__ == "__main__":
    main()
