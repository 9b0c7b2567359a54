"""Paper-scale memory and time of one training step, with the chunked matching on and off.

One real 520x704 shsy5y image (de504eaa5349, the densest fixture: 496 cells) with its truth
replicated to ~100, ~800 and ~1500 boxes (copies of the real masks shifted by up to 24 px, each
box the tight box of its shifted mask), at the paper profile's input (540/720: 531x720) and at
the authors' fine-tuning scale (800/1333: 800x1088). For each detector branch (Faster R-CNN
Swin-T, Cascade R-CNN ResNeXt-101 / ResNeSt-101, the Cascade Mask R-CNN baseline; paper widths,
random init) it measures one training step (forward, backward, AdamW step; batch ``--batch``):

- ``on``: the configs' ``match_chunk`` (chunked matching, :mod:`cellmask.models.matching`);
- ``off``: ``match_chunk: null`` for the RPN and the RoI heads (torchvision's full IoU tables),
  the "before" in the same run.

and the segmenter's training step on one ``CropDataset`` batch of its paper config. Each case
runs in a fresh subprocess: peak RSS on a CPU (a watchdog kills a case whose RSS passes
``--mem-limit-gb`` and reports it as over the limit; an ``off`` case whose IoU tables alone are
estimated to pass the limit is skipped with the estimate), ``torch.cuda.max_memory_allocated``
on CUDA.

Printed: the table, peak(800)/peak(100) and peak(1500)/peak(100) per branch and input (target
<= 1.5x with matching on), and an extrapolation of a batch-2 step on a GPU (target <= 12 GB):

    weights (4 B/parameter) + gradients and AdamW moments (12 B/trainable parameter)
      + 2 x (peak - RSS after building the model - gradients and moments + one image's data)

i.e. the one-image activations and temporaries (what the CPU allocator held at the peak) and the
image with its truth (the baseline's uint8 masks: 0.55 GB at 1500 truths) doubled.
It is fp32 (AMP roughly halves the activations) and leaves out the CUDA context (~0.5 GB).
On CUDA the figures are measured, not extrapolated (run with ``--batch 2``).

    python benchmarks/bench_paper_scale.py [--device cpu|cuda] [--threads 1] [--batch 1]
        [--branches ...] [--inputs paper 800] [--truths 100 800 1500] [--mem-limit-gb N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench_detectors import BRANCHES, _peak_rss_mb, _sync

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "sartorius_real"
IMAGE_ID = "de504eaa5349"
SEGMENTER = "segmenter_upernet_swin_t"
INPUTS = {"paper": None, "800": (800, 1333)}  # None: the config's (paper) transform
TRUTHS = (100, 800, 1500)
MAX_SHIFT = 24
MB = 1 << 20


def _rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / (1 << 20)
    return 0.0


# ---------------------------------------------------------------------------------------- data


def replicated_truth(n: int, seed: int = 0):
    """``(image float [3, H, W], boxes float32 [n, 4], pixels: n (rows, cols))`` of the densest
    fixture: its first ``n`` instances, then copies shifted by up to ``MAX_SHIFT`` px."""
    import numpy as np
    import torch

    from cellmask.data.crops import instance_pixels, tight_boxes
    from cellmask.data.images import read_image
    from cellmask.data.sartorius import read_train_csv

    record = next(r for r in read_train_csv(FIXTURES / "train.csv") if r.image_id == IMAGE_ID)
    image = torch.from_numpy(read_image(FIXTURES / "train" / f"{IMAGE_ID}.png")).float().div(255)
    h, w = record.height, record.width
    real = [instance_pixels(record, i) for i in range(len(record))]
    rng = np.random.default_rng(seed)
    pixels = list(real[:n])
    while len(pixels) < n:
        ys, xs = real[int(rng.integers(len(real)))]
        dy, dx = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2)
        ys, xs = ys + dy, xs + dx
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        if inside.sum() >= 20:
            pixels.append((ys[inside], xs[inside]))
    return image.expand(3, -1, -1).contiguous(), tight_boxes(pixels), pixels


def full_table_gb(n: int, input_hw: tuple[int, int]) -> float:
    """What torchvision's full anchor matching holds at once: ~40 B per (truth, anchor) pair
    (box_iou's [G, A, 2] corners, the IoU table, the Matcher's bool table)."""
    h, w = input_hw
    anchors = sum(5 * math.ceil(h / s) * math.ceil(w / s) for s in (4, 8, 16, 32, 64))
    return 40 * n * anchors / (1 << 30)


# -------------------------------------------------------------------------------------- workers


def _config(name: str, input_name: str, matching: str) -> dict:
    from cellmask.config import load_config

    overrides: dict = {"model": {"backbone": {"pretrained": False}}}
    if INPUTS.get(input_name):
        overrides["model"]["transform"] = dict(zip(("min_size", "max_size"), INPUTS[input_name], strict=True))
    if matching == "off":
        overrides["model"]["rpn"] = {"match_chunk": None}
        overrides["model"]["roi"] = {"match_chunk": None}
    return load_config(ROOT / "configs" / f"{name}.yaml", profile="paper", overrides=overrides)


def _measure(model, step_fn, device: str, rss_data: float) -> dict:
    """One optimizer step (forward, backward, AdamW) of ``model``: time, peak memory, sizes."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    rss_model = _rss_mb()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-2)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    losses = step_fn()
    loss = sum(v for k, v in losses.items() if k.startswith("loss"))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    _sync(device)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_mb": torch.cuda.max_memory_allocated() / MB if device == "cuda" else _peak_rss_mb(),
        "rss_data_mb": rss_data,
        "rss_model_mb": rss_model,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
    }


def worker_detector(case: dict) -> dict:
    import torch

    from cellmask.models import build_detector

    device, batch = case["device"], case["batch"]
    image, boxes, pixels = replicated_truth(case["truths"])
    cfg = _config(case["name"], case["input"], case["matching"])
    target = {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}
    if cfg["model"]["type"] == "cascade_mask_rcnn":  # the data contract: uint8 [N, H, W]
        masks = torch.zeros((len(pixels), *image.shape[-2:]), dtype=torch.uint8)
        for i, (ys, xs) in enumerate(pixels):
            masks[i, torch.from_numpy(ys), torch.from_numpy(xs)] = 1
        target["masks"] = masks
    target = {k: v.to(device) for k, v in target.items()}
    images, targets = [image.to(device)] * batch, [target] * batch
    rss0 = _rss_mb()
    torch.manual_seed(0)
    model = build_detector(cfg["model"], num_classes=4).train().to(device)
    out = _measure(model, lambda: model(images, targets), device, rss0)
    data = image.nbytes + sum(v.nbytes for v in target.values())  # one image and its truth
    return {**out, "data_mb": data / MB, "input_hw": list(model.transform([image])[0].tensors.shape[-2:])}


def worker_segmenter(case: dict) -> dict:
    import torch

    from cellmask.config import load_config
    from cellmask.data.crops import CropDataset
    from cellmask.data.datasets import collate
    from cellmask.data.sartorius import read_train_csv
    from cellmask.models.segmenter import build_segmenter

    device = case["device"]
    cfg = load_config(
        ROOT / "configs" / f"{SEGMENTER}.yaml", profile="paper", overrides=["model.backbone.pretrained=false"]
    )
    records = sorted(read_train_csv(FIXTURES / "train.csv", FIXTURES / "train"), key=len, reverse=True)
    crop = cfg["model"]["crop"]
    dataset = CropDataset(
        records, cfg["crops"], size=int(crop["size"]), sampling_ratio=int(crop["sampling_ratio"])
    )
    torch.manual_seed(0)
    n_images = case.get("segmenter_images") or int(cfg["train"]["batch_size"])
    crops, targets = collate([dataset[i % len(dataset)] for i in range(n_images)])
    crops = [c.to(device) for c in crops]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    rss0 = _rss_mb()
    model = build_segmenter(cfg["model"]).train().to(device)
    out = _measure(model, lambda: model.training_step((crops, targets)), device, rss0)
    data = sum(c.nbytes for c in crops) + sum(t["masks"].nbytes for t in targets)
    return {**out, "data_mb": data / MB / n_images, "crops": sum(len(c) for c in crops), "images": n_images}


def run_worker(case: dict) -> None:
    import torch

    torch.set_num_threads(case["threads"])
    fn = worker_segmenter if case["name"] == SEGMENTER else worker_detector
    print(json.dumps(fn(case)))


# ----------------------------------------------------------------------------------------- main


def run_case(case: dict, limit_gb: float) -> dict:
    """Run ``case`` in a fresh process; kill it if its RSS passes ``limit_gb``."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(case)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = False
    while proc.poll() is None:
        try:
            if case["device"] == "cpu" and _rss_mb(proc.pid) > limit_gb * 1024:
                proc.send_signal(signal.SIGKILL)
                killed = True
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    out, err = proc.communicate()
    if killed:
        return {"status": f"over {limit_gb:.1f} GB (killed)"}
    if proc.returncode:
        return {"status": "failed: " + (err.strip().splitlines() or ["?"])[-1][:120]}
    return {"status": "ok", **json.loads(out.strip().splitlines()[-1])}


def gpu_batch2_gb(r: dict, batch: int) -> float:
    """The extrapolation in the module docstring (a measurement on CUDA)."""
    if r.get("device") == "cuda":
        return r["peak_mb"] / 1024
    weights = 4 * r["params"] / MB
    state = 12 * r["trainable"] / MB
    activations = max(r["peak_mb"] - r["rss_model_mb"] - state, 0.0) / batch
    return (weights + state + 2 * (activations + r["data_mb"])) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--branches", nargs="+", default=[*BRANCHES, SEGMENTER])
    p.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    p.add_argument("--truths", nargs="+", type=int, default=list(TRUTHS))
    p.add_argument("--matching", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--mem-limit-gb", type=float, default=None, help="default: MemAvailable - 2 GB")
    p.add_argument("--json", default=None, help="also write every case's figures to this file")
    p.add_argument(
        "--segmenter-images",
        type=int,
        default=None,
        help="images per segmenter step (default: its train.batch_size)",
    )
    args = p.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker))
        return
    limit = args.mem_limit_gb or max(_available_gb() - 2.0, 2.0)
    print(f"device {args.device}, {args.threads} thread(s), batch {args.batch}, memory limit {limit:.1f} GB")
    print(f"image {IMAGE_ID} (520x704) with its truth replicated to {args.truths} boxes\n")
    common = {
        "device": args.device,
        "threads": args.threads,
        "batch": args.batch,
        "segmenter_images": args.segmenter_images,
    }
    results = []
    header = f"{'model':30s} {'input':>9s} {'truths':>6s} {'match':>5s} {'peak MB':>9s} {'model MB':>9s} {'step s':>7s} {'GPU b2 GB':>9s}"
    print(header)
    for name in args.branches:
        grid = (
            [("-", 0, "-")]
            if name == SEGMENTER
            else [(i, n, m) for i in args.inputs for n in args.truths for m in args.matching]
        )
        for input_name, truths, matching in grid:
            case = {**common, "name": name, "input": input_name, "truths": truths, "matching": matching}
            hw = (800, 1088) if input_name == "800" else (544, 736)
            if matching == "off" and full_table_gb(truths, hw) + 3.0 > limit:
                r = {
                    "status": f"skipped: full tables ~{full_table_gb(truths, hw):.0f} GB + model > {limit:.1f} GB"
                }
            else:
                r = run_case(case, limit)
            r.update(case)
            results.append(r)
            if r["status"] == "ok":
                gpu = gpu_batch2_gb(r, args.batch)
                print(
                    f"{name:30s} {input_name:>9s} {truths or '-':>6} {matching:>5s} {r['peak_mb']:9.0f} "
                    f"{r['rss_model_mb']:9.0f} {r['seconds']:7.1f} {gpu:9.1f}"
                )
            else:
                print(f"{name:30s} {input_name:>9s} {truths or '-':>6} {matching:>5s}  {r['status']}")
            sys.stdout.flush()

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("\npeak ratios (matching on: target <= 1.5x)")
    ok = {(r["name"], r["input"], r["truths"], r["matching"]): r for r in results if r["status"] == "ok"}
    for name in args.branches:
        if name == SEGMENTER:
            continue
        for input_name in args.inputs:
            for matching in args.matching:
                base = ok.get((name, input_name, 100, matching))
                cells = []
                for n in (800, 1500):
                    r = ok.get((name, input_name, n, matching))
                    cells.append(
                        f"peak({n})/peak(100) {r['peak_mb'] / base['peak_mb']:.2f}x"
                        if r and base
                        else f"peak({n})/peak(100) n/a"
                    )
                print(f"  {name:30s} {input_name:>5s} {matching:>3s}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
