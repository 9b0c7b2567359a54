"""Benchmark: validation's COCO box AP (faster-coco-eval) against pycocotools as it used to run.

The baseline is the old ``cellmask.training.validation.coco_box_ap``, re-implemented here
(:func:`pycocotools_box_ap`): pycocotools' ``COCOeval`` with its default four area ranges (all,
small, medium, large), maxDets (100, 300, 1000), AP read at area ``all`` and 1000 detections.
Ours is today's :func:`cellmask.training.validation.coco_box_ap` (faster-coco-eval's C++
``COCOeval_faster``, the area range ``all`` only). Both take the same detections and truths
(xyxy arrays) and build their COCO datasets inside the timed call; the two APs are checked to
be equal to 1e-6.

1. Seconds per image on synthetic 520x704 images of one cell type with 300 and 2000 cells and 3x
   as many detections (90% of the cells found, jittered; a second, lower-scored copy of most of
   them; false positives; 5% with a wrong class among LIVECell's 8). The baseline runs once (it
   is slow), ours ``--repeats`` times (the median counts).
2. A LIVECell epoch's CPU evaluation on a LIVECell-like synthetic val set: 570 images of 8 cell
   types (71-72 each), ~313 cells on average (per-type densities and detection quality differ;
   illustrative values, not LIVECell's figures), 3x as many detections. The baseline runs on a
   stratified sample of ``--sample`` images (equal APs checked) and is projected to all 570 and
   to the configured subset (``val.max_images`` of ``configs/faster_rcnn_swin_t.yaml``, paper
   profile); ours is measured on both.
3. The subsets of :func:`validation_subset` (seeds ``0 .. --seeds - 1``): their AP against the
   whole set's, for a few sizes (the sampling error a subset adds).

::

    .venv/bin/python benchmarks/bench_validation.py [--images 3] [--dense-images 1] [--repeats 5] \\
        [--sample 24] [--seeds 3]

The process exits 1 if an AP of ours differs from the baseline's by more than 1e-6.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from cellmask.config import get, load_config
from cellmask.training.split import validation_subset
from cellmask.training.validation import coco_box_ap

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "faster_rcnn_swin_t.yaml"
MAX_DETS = (100, 300, 1000)
NUM_CLASSES = 9  # LIVECell: 8 cell types + background
LIVECELL_VAL_IMAGES = 570
HEIGHT, WIDTH = 520, 704
# The LIVECell-like set (section 3): mean cells per image and box jitter (fraction of the side)
# per type; illustrative values with a mean of 312.5 cells, not LIVECell's own figures.
TYPE_CELLS = (150, 330, 600, 120, 330, 250, 400, 320)
TYPE_JITTER = (0.04, 0.06, 0.10, 0.05, 0.07, 0.12, 0.08, 0.06)


# ----------------------------------------------------------------------------------------------
# The baseline: pycocotools as the old coco_box_ap ran it, self-contained
# ----------------------------------------------------------------------------------------------


def pycocotools_box_ap(predictions: list[dict], truths: list[dict], num_classes: int) -> dict[str, float]:
    """AP / AP50 / AP75 by pycocotools' COCOeval with its default area ranges (the old code)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, gts, dts = [], [], []
    for image_id, (pred, truth) in enumerate(zip(predictions, truths, strict=True), start=1):
        images.append({"id": image_id, "height": HEIGHT, "width": WIDTH})
        for sink, boxes, labels, scores in (
            (gts, truth["boxes"], truth["labels"], None),
            (dts, pred["boxes"], pred["labels"], pred["scores"]),
        ):
            xywh = np.asarray(boxes, dtype=np.float64).copy()
            xywh[:, 2:] -= xywh[:, :2]
            for k, (box, label) in enumerate(zip(xywh, labels, strict=True)):
                ann = {"id": len(sink) + 1, "image_id": image_id, "category_id": int(label), "iscrowd": 0}
                ann.update(bbox=[float(v) for v in box], area=float(box[2] * box[3]))
                if scores is not None:
                    ann["score"] = float(scores[k])
                sink.append(ann)
    cats = [{"id": c, "name": str(c)} for c in range(1, num_classes)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt, dt = COCO(), COCO()
        gt.dataset = {"images": images, "annotations": gts, "categories": cats}
        dt.dataset = {"images": images, "annotations": dts, "categories": cats}
        gt.createIndex()
        dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.maxDets = list(MAX_DETS)
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # area "all", 1000 detections
    thresholds = list(np.round(ev.params.iouThrs, 2))

    def mean(values: np.ndarray) -> float:
        values = values[values > -1]
        return float(values.mean()) if values.size else float("nan")

    return {
        "AP": mean(precision),
        "AP50": mean(precision[thresholds.index(0.5)]),
        "AP75": mean(precision[thresholds.index(0.75)]),
    }


# ----------------------------------------------------------------------------------------------
# Synthetic images
# ----------------------------------------------------------------------------------------------


def synthetic_image(
    n_cells: int, label: int, jitter: float, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(prediction, truth)`` of one image: ``n_cells`` xyxy boxes of 8-40 px of class ``label``,
    and ``3 * n_cells`` detections (see the module docstring)."""
    corners = rng.uniform(0.0, [WIDTH - 40, HEIGHT - 40], (n_cells, 2))
    truth_boxes = np.concatenate([corners, corners + rng.uniform(8.0, 40.0, (n_cells, 2))], axis=1)
    side = np.tile(truth_boxes[:, 2:] - truth_boxes[:, :2], 2)
    found = np.flatnonzero(rng.random(n_cells) < 0.9)
    twins = found[rng.random(len(found)) < 0.9]
    parts, scores = [], []
    for cells, scale, top in ((found, 1.0, 1.0), (twins, 2.0, 0.6)):
        noise = rng.normal(0.0, jitter * scale, (len(cells), 4))
        parts.append(truth_boxes[cells] + noise * side[cells])
        scores.append(top - 2.0 * np.abs(noise).mean(axis=1) + rng.normal(0.0, 0.05, len(cells)))
    n_false = 3 * n_cells - len(found) - len(twins)
    corners = rng.uniform(0.0, [WIDTH - 40, HEIGHT - 40], (n_false, 2))
    parts.append(np.concatenate([corners, corners + rng.uniform(8.0, 40.0, (n_false, 2))], axis=1))
    scores.append(rng.uniform(0.05, 0.5, n_false))
    boxes = np.concatenate(parts)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1.0)
    labels = np.full(len(boxes), label, dtype=np.int64)
    wrong = rng.random(len(boxes)) < 0.05
    labels[wrong] = rng.integers(1, NUM_CLASSES, int(wrong.sum()))
    prediction = {
        "boxes": boxes.astype(np.float32),
        "scores": np.clip(np.concatenate(scores), 0.05, 1.0).astype(np.float32),
        "labels": labels,
    }
    return prediction, {"boxes": truth_boxes.astype(np.float32), "labels": np.full(n_cells, label)}


def livecell_like_set(seed: int) -> tuple[list[dict], list[dict], list[SimpleNamespace]]:
    """``(predictions, truths, records)`` of 570 images of 8 types (section 3 of the docstring);
    ``records`` carry ``image_id`` and ``cell_type`` for :func:`validation_subset`."""
    rng = np.random.default_rng(seed)
    predictions, truths, records = [], [], []
    for i in range(LIVECELL_VAL_IMAGES):
        t = i % len(TYPE_CELLS)
        n_cells = max(10, int(TYPE_CELLS[t] * rng.uniform(0.5, 1.5)))
        prediction, truth = synthetic_image(n_cells, t + 1, TYPE_JITTER[t], rng)
        predictions.append(prediction)
        truths.append(truth)
        records.append(SimpleNamespace(image_id=f"type{t}_{i:04d}", cell_type=f"type{t}", index=i))
    return predictions, truths, records


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def timed(fn, repeats: int, *args, **kwargs) -> tuple[float, dict[str, float]]:
    """Median wall time of ``repeats`` calls of ``fn(*args, **kwargs)`` (robust to a busy
    machine's spikes, not favoured by its quiet moments) and its last result."""
    seconds, result = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds.append(time.perf_counter() - t0)
    return float(np.median(seconds)), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="300-cell images per run (default 3)")
    parser.add_argument("--dense-images", type=int, default=1, help="2000-cell images per run (default 1)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs of ours; the median counts (default 5)"
    )
    parser.add_argument(
        "--sample", type=int, default=24, help="LIVECell-like images the baseline runs on (default 24)"
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="subset seeds compared with the whole set (default 3)"
    )
    args = parser.parse_args(argv)
    if min(args.images, args.dense_images, args.repeats, args.sample, args.seeds) < 1:
        parser.error("--images, --dense-images, --repeats, --sample and --seeds must be at least 1")

    subset = get(load_config(CONFIG, profile="paper"), "val.max_images")
    import faster_coco_eval  # noqa: F401  (imported before the timing: both sides start warm)
    import pycocotools.cocoeval  # noqa: F401

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    equal, per_image = True, {}
    header = "cells  images  pycocotools s/image  ours s/image  speed-up  AP pycocotools  AP ours"
    print(header)
    for n_cells, n_images in ((300, args.images), (2000, args.dense_images)):
        rng = np.random.default_rng(n_cells)
        pairs = [synthetic_image(n_cells, 1, 0.06, rng) for _ in range(n_images)]
        predictions, truths = [p for p, _ in pairs], [t for _, t in pairs]
        t_base, ap_base = timed(pycocotools_box_ap, 1, predictions, truths, NUM_CLASSES)
        t_ours, ap_ours = timed(
            coco_box_ap, args.repeats, predictions, truths, num_classes=NUM_CLASSES, max_dets=MAX_DETS
        )
        same = all(abs(ap_ours[k] - ap_base[k]) <= 1e-6 for k in ap_base)
        equal &= same
        per_image[n_cells] = (t_base / n_images, t_ours / n_images)
        print(
            f"{n_cells:5d}  {n_images:6d}  {t_base / n_images:19.3f}  {t_ours / n_images:12.4f}  "
            f"{t_base / t_ours:7.1f}x  {ap_base['AP']:14.6f}  {ap_ours['AP']:7.6f}"
            f"{'' if same else '  DIFFERENT'}"
        )

    predictions, truths, records = livecell_like_set(seed=0)
    n_all = len(records)
    n_sub = min(int(subset), n_all) if subset else n_all
    cells = np.mean([len(t["boxes"]) for t in truths])

    def ours_on(chosen: list[SimpleNamespace]) -> tuple[float, dict[str, float]]:
        preds, truth = [predictions[r.index] for r in chosen], [truths[r.index] for r in chosen]
        return timed(coco_box_ap, 1, preds, truth, num_classes=NUM_CLASSES, max_dets=MAX_DETS)

    sample = validation_subset(records, args.sample, seed=1)
    preds, truth = [predictions[r.index] for r in sample], [truths[r.index] for r in sample]
    t_base, ap_base = timed(pycocotools_box_ap, 1, preds, truth, NUM_CLASSES)
    t_ours, ap_ours = ours_on(sample)
    same = all(abs(ap_ours[k] - ap_base[k]) <= 1e-6 for k in ap_base)
    equal &= same
    base_image = t_base / len(sample)
    t_all, ap_all = ours_on(records)
    t_sub, _ = ours_on(validation_subset(records, n_sub, seed=0))
    print(
        f"LIVECell-like val set: {n_all} images, {cells:.0f} cells on average; a stratified sample of "
        f"{len(sample)}: pycocotools 4 areas {base_image:.3f} s/image, ours {t_ours / len(sample):.4f}, "
        f"speed-up {t_base / t_ours:.1f}x, AP {ap_base['AP']:.6f} / {ap_ours['AP']:.6f}"
        f"{'' if same else '  DIFFERENT'}"
    )
    print(
        f"LIVECell epoch, CPU minutes of evaluation: all {n_all} images: pycocotools 4 areas "
        f"{n_all * base_image / 60:.1f} (projected from the sample), ours {t_all / 60:.2f} (measured); "
        f"the configured subset (val.max_images={subset}: {n_sub} images): pycocotools "
        f"{n_sub * base_image / 60:.1f} (projected), ours {t_sub / 60:.2f} (measured)"
    )
    print(f"ours on all {n_all}: AP {ap_all['AP']:.4f}; subsets (ours), AP - AP(all {n_all}):")
    sizes = sorted({100, 200, 300, n_sub} - {n_all})
    for size in sizes:
        gaps, seconds = [], []
        for seed in range(args.seeds):
            t_sub, ap_sub = ours_on(validation_subset(records, size, seed))
            gaps.append(ap_sub["AP"] - ap_all["AP"])
            seconds.append(t_sub)
        mark = "  (configured)" if size == n_sub else ""
        print(
            f"  {size:3d} images: {np.mean(seconds):.1f} s, seeds 0-{args.seeds - 1}: "
            f"{' '.join(f'{g:+.4f}' for g in gaps)}{mark}"
        )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
