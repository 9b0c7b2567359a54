"""Benchmark: the MDE-CellMask ensemble's inference time per image, stage by stage.

Paper-profile models (random initialisation, ``pretrained`` off: speed does not depend on the
weights), on the real 520x704 fixture image ``--image`` (default ``de504eaa5349``, 496 shsy5y
cells: the most crowded fixture image, so the cell-count-dependent stages are near their worst):

- each branch's forward on the image (view ``identity``) and on its mirror (view ``hflip``: the
  cost of flip TTA), through :meth:`Predictor.detect_raw`; the fourth branch is Soft Teacher's
  inference model, a Faster R-CNN ResNeXt-101 (``configs/base.yaml``; a Soft Teacher config is
  used instead when one exists);
- WBF, segmenter, paste, post-processing and RLE on *realistic* detections: random-init
  detectors find noise, so every (branch, view) entry gets the image's truth boxes jittered by
  ~1.5 px plus 20% random low-score boxes. The segmenter's forward is timed on ``--seg-crops``
  crops and scaled to the image's cell count (its cost is linear in crops: batches of 64); the
  paste, overlap removal and RLE then run on every fused box;
- torchvision ``maskrcnn_resnet50_fpn`` (``weights=None``) on the same image in the same run:
  the ratio is against it;
- peak RSS of the process, and FLOPs of each forward (``torch.utils.flop_counter``, one extra
  forward per model, not timed).

The Kaggle estimate (hidden test set ~240 images, one T4, limit 9 h) is FLOP-based: forwards
at a sustained T4 throughput (``--t4-tflops``, fp32 and AMP figures) plus the CPU-side stages
(WBF, paste, post-processing, RLE) as measured here, per image. ::

    .venv/bin/python benchmarks/bench_inference.py            # 1 thread, ~10 min on a quiet core
    .venv/bin/python benchmarks/bench_inference.py --threads 2 --seg-crops 64
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
REAL = ROOT / "tests" / "fixtures" / "sartorius_real"
BRANCHES = [
    ("faster_rcnn_swin_t.yaml", 2.0),
    ("cascade_rcnn_resnext101.yaml", 3.0),
    ("cascade_rcnn_resnest101.yaml", 3.0),
    (None, 1.0),  # Soft Teacher's inference model (see the module docstring)
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flops_of(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def soft_teacher_config() -> Path:
    found = sorted(CONFIGS.glob("soft_teacher*.yaml"))
    return found[0] if found else CONFIGS / "base.yaml"


def build_branches():
    from cellmask.config import load_config
    from cellmask.models import build_detector
    from cellmask.predict import Branch, model_name

    branches = []
    for name, weight in BRANCHES:
        path = CONFIGS / name if name else soft_teacher_config()
        cfg = load_config(path, "paper")
        cfg["model"]["backbone"]["pretrained"] = False
        torch.manual_seed(0)
        model = build_detector(cfg["model"], num_classes=4)
        if callable(getattr(model, "inference_model", None)):
            model = model.inference_model()
        label = model_name(cfg)
        if name is None:  # the teacher is what runs at inference
            label += " (teacher)" if path.name.startswith("soft_teacher") else " (Soft Teacher's teacher)"
        branches.append(Branch(label, model.eval(), weight))
    return branches


def realistic_raw(branches, boxes: np.ndarray, label: int, size, seed: int = 0):
    """Per branch and view: the truth boxes jittered, plus 20% random low-score boxes."""
    from cellmask.predict import Detections

    rng = np.random.default_rng(seed)
    h, w = size
    raw = {}
    for b in branches:
        views = []
        for _ in range(2):
            jitter = boxes + rng.normal(0, 1.5, boxes.shape)
            n_false = len(boxes) // 5
            xy = rng.uniform([0, 0], [w - 30, h - 30], (n_false, 2))
            false = np.c_[xy, xy + rng.uniform(8, 30, (n_false, 2))]
            all_boxes = np.clip(np.r_[jitter, false], 0, [w, h, w, h])
            scores = np.r_[rng.uniform(0.4, 1.0, len(boxes)), rng.uniform(0.05, 0.4, n_false)]
            order = np.argsort(-scores)
            views.append(Detections(all_boxes[order], scores[order], np.full(len(scores), label)))
        raw[b.name] = views
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--image", default="de504eaa5349", help="fixture image id (default de504eaa5349)")
    parser.add_argument("--seg-crops", type=int, default=128, help="crops the segmenter forward is timed on")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the cheap stages (median)")
    parser.add_argument(
        "--no-flops", action="store_true", help="skip the FLOP counts (one forward less per model)"
    )
    parser.add_argument("--t4-tflops", type=float, nargs=2, default=(4.0, 16.0), metavar=("FP32", "AMP"))
    parser.add_argument("--test-images", type=int, default=240, help="hidden test set size (default 240)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from cellmask.config import load_config
    from cellmask.data.classes import CLASS_TO_LABEL
    from cellmask.data.images import read_image
    from cellmask.data.sartorius import read_train_csv
    from cellmask.models.segmenter import build_segmenter
    from cellmask.predict import Predictor, ProbabilityStore

    record = next(r for r in read_train_csv(REAL / "train.csv") if r.image_id == args.image)
    image = read_image(record.path, (record.height, record.width))
    size = (record.height, record.width)
    n_cells = len(record)
    print(
        f"image {record.image_id} ({record.cell_type}, {size[0]}x{size[1]}, {n_cells} cells); "
        f"torch {torch.__version__}, {args.threads} thread(s); paper-profile models, random init"
    )

    rows: list[tuple[str, float, float]] = []  # (stage, seconds per image, GFLOPs)
    branches = build_branches()
    seg_cfg = load_config(CONFIGS / "segmenter_upernet_swin_t.yaml", "paper")
    seg_cfg["model"]["backbone"]["pretrained"] = False
    segmenter = build_segmenter(seg_cfg["model"]).eval()
    predictor = Predictor(branches, segmenter, {"device": "cpu"})
    tensor = predictor.to_tensor(image)
    print(f"models built; peak RSS {peak_rss_mb():.0f} MB")

    # 1. branches, each view
    for b in branches:
        for view in ("identity", "hflip"):
            predictor.timings.clear()
            predictor.detect_raw([tensor], views=(view,), branches=[b.name])
            seconds = predictor.timings[f"detect {b.name}"]
            gflops = 0.0
            if not args.no_flops and view == "identity":
                gflops = flops_of(lambda b=b: b.model([tensor])) / 1e9
            rows.append((f"{b.name} [{'TTA flip' if view == 'hflip' else 'image'}]", seconds, gflops))
            print(
                f"  {rows[-1][0]:<52} {seconds:8.2f} s  {gflops:8.0f} GFLOPs  RSS {peak_rss_mb():.0f} MB",
                flush=True,
            )
    for k in range(len(branches)):  # a flipped forward costs what the plain one does
        rows[2 * k + 1] = (rows[2 * k + 1][0], rows[2 * k + 1][1], rows[2 * k][2])

    # 2. WBF on realistic detections (2 views x 4 branches)
    raw = realistic_raw(
        branches, np.asarray(record.boxes, np.float64), CLASS_TO_LABEL[record.cell_type], size
    )
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fused = predictor.fuse(raw, size)
        times.append(time.perf_counter() - start)
    rows.append(
        (
            f"WBF ({sum(len(v) for vs in raw.values() for v in vs)} boxes -> {len(fused)})",
            statistics.median(times),
            0.0,
        )
    )

    # 3. segmenter forward on a subset, scaled to the fused boxes the thresholds keep
    keep = fused.scores >= 0.25
    n_kept = int(keep.sum())
    k = min(args.seg_crops, n_kept)
    boxes = torch.as_tensor(fused.boxes[keep][:k], dtype=torch.float32)
    rois = torch.cat([torch.zeros((k, 1)), boxes], 1)
    start = time.perf_counter()
    probs = segmenter.predict_probs(tensor[None], rois)
    per_crop = (time.perf_counter() - start) / k
    seg_gflops = (
        0.0 if args.no_flops else flops_of(lambda: segmenter.predict_probs(tensor[None], rois[:8])) / 8 / 1e9
    )
    rows.append((f"segmenter forward ({n_kept} crops; timed on {k})", per_crop * n_kept, seg_gflops * n_kept))
    print(
        f"  segmenter {per_crop * 1000:.0f} ms/crop, {seg_gflops:.1f} GFLOPs/crop; RSS {peak_rss_mb():.0f} MB",
        flush=True,
    )

    # 4. paste + post-processing + RLE on every kept box (probabilities of the timed crops, tiled)
    tiled = probs.repeat((n_kept + k - 1) // k, 1, 1, 1)
    times = {"segmenter": [], "postprocess": [], "rle": []}
    for _ in range(args.repeats):
        store = ProbabilityStore()
        store.get(fused.boxes[keep], lambda sel: tiled[: len(sel)])
        predictor.timings.clear()
        inst = predictor.finish(tensor, fused, store=store)
        predictor.rles(inst)
        for key in times:
            times[key].append(predictor.timings[key])
    rows.append(("paste (windowed)", statistics.median(times["segmenter"]), 0.0))
    rows.append(
        (
            f"post-processing (vote, thresholds, overlaps: {len(inst)} kept)",
            statistics.median(times["postprocess"]),
            0.0,
        )
    )
    rows.append((f"RLE ({len(inst)} rows)", statistics.median(times["rle"]), 0.0))

    # 5. the baseline in the same run
    torch.manual_seed(0)
    baseline = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    with torch.no_grad():
        start = time.perf_counter()
        baseline([tensor])
        base_seconds = time.perf_counter() - start
    base_gflops = 0.0 if args.no_flops else flops_of(lambda: baseline([tensor])) / 1e9

    total = sum(r[1] for r in rows)
    total_gflops = sum(r[2] for r in rows)
    cpu_side = sum(r[1] for r in rows if r[2] == 0.0)
    print()
    print(f"{'stage':<66} {'s/image':>9} {'share':>6} {'GFLOPs':>8}")
    for name, seconds, gflops in rows:
        print(f"{name:<66} {seconds:9.3f} {seconds / total:6.1%} {gflops:8.0f}")
    print(
        f"{'ensemble total (4 branches x 2 views + WBF + segmenter + post + RLE)':<66} {total:9.3f} {1:6.0%} {total_gflops:8.0f}"
    )
    print(
        f"{'torchvision maskrcnn_resnet50_fpn (weights=None), same image':<66} {base_seconds:9.3f} {'':>6} {base_gflops:8.0f}"
    )
    print(
        f"ratio ensemble / maskrcnn_resnet50_fpn: {total / base_seconds:.1f}x time"
        + ("" if args.no_flops else f", {total_gflops / base_gflops:.1f}x FLOPs")
    )
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    if not args.no_flops:
        # a typical image: the fixture's mean cell count, with as many kept boxes per cell as here
        records = read_train_csv(REAL / "train.csv")
        mean_cells = float(np.mean([len(r) for r in records]))
        scale = mean_cells / n_cells
        det_gflops = sum(r[2] for r in rows[: 2 * len(branches)])
        typical_gflops = det_gflops + seg_gflops * n_kept * scale
        typical_cpu = rows[2 * len(branches)][1] * scale + sum(r[1] for r in rows[-3:]) * scale
        fp32, amp = args.t4_tflops
        print(
            f"Kaggle estimate (T4; forwards at a sustained throughput, CPU-side stages as measured here, "
            f"{args.test_images} images):"
        )
        for label, tflops in (("fp32", fp32), ("AMP", amp)):
            worst = total_gflops / (tflops * 1e3) + cpu_side
            typical = typical_gflops / (tflops * 1e3) + typical_cpu
            print(
                f"  {label} at {tflops:g} TFLOP/s: {typical:.2f} s/image for a typical image ({mean_cells:.0f} cells), "
                f"{worst:.2f} s for this one ({n_cells}) -> {typical * args.test_images / 60:.0f} min "
                f"(at worst {worst * args.test_images / 60:.0f} min) + model loading; the limit is 9 h"
            )


if __name__ == "__main__":
    main()
