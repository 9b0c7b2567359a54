"""Detector benchmark: paper-profile inference time and demo-profile training cost per branch.

For every branch config (and the Cascade Mask R-CNN baseline) this prints

* the paper-profile forward time on one real 520x704 image (eval mode, no grad, random
  weights: speed does not depend on the weights, except through the number of boxes kept,
  which ``score_thresh`` caps the same way for every model), and its ratio to torchvision's
  ``maskrcnn_resnet50_fpn`` measured in the same run on the same image;
* the demo-profile training step time (batch 2, synthetic images at the demo size) and the
  peak resident memory of a process that builds the model and trains it.

Each measurement runs in a fresh subprocess so peak RSS belongs to that model alone.

    python benchmarks/bench_detectors.py [--device cpu|cuda] [--repeats 3] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "tests" / "fixtures" / "sartorius_real" / "train" / "0030fd0e6378.png"
BRANCHES = [
    "faster_rcnn_swin_t",
    "cascade_rcnn_resnext101",
    "cascade_rcnn_resnest101",
    "cascade_mask_rcnn_resnext101",
]
REFERENCE = "torchvision_maskrcnn_resnet50_fpn"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _build(name: str, profile: str) -> tuple:
    """``(model, resolved config)`` of a branch (config ``None`` for the torchvision reference)."""
    from cellmask.config import load_config
    from cellmask.data.classes import CLASS_TO_LABEL
    from cellmask.models import build_detector

    if name == REFERENCE:
        import torchvision

        model = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=len(CLASS_TO_LABEL) + 1
        )
        return model, None
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", profile=profile)
    cfg["model"]["backbone"]["pretrained"] = False
    return build_detector(cfg["model"], num_classes=len(CLASS_TO_LABEL) + 1), cfg


def worker_forward(name: str, device: str, repeats: int) -> dict:
    """Paper-profile forward time of one branch on the real image (median of ``repeats``)."""
    import torch

    from cellmask.data.images import read_image

    model, _ = _build(name, "paper")
    model.eval().to(device)
    image = torch.from_numpy(read_image(IMAGE)).float().div(255).expand(3, -1, -1).contiguous().to(device)
    autocast = (
        torch.autocast("cuda", dtype=torch.float16)
        if device == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    times = []
    with torch.no_grad(), autocast:
        model([image])  # warm-up
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            out = model([image])[0]
            _sync(device)
            times.append(time.perf_counter() - start)
    return {"forward_s": statistics.median(times), "boxes": len(out["boxes"]), "peak_rss_mb": _peak_rss_mb()}


def worker_train(name: str, device: str, steps: int) -> dict:
    """Demo-profile training step time (batch 2) and peak RSS."""
    import numpy as np
    import torch

    from cellmask.data.classes import CLASS_TO_LABEL
    from cellmask.data.synthetic import synth_image

    model, cfg = _build(name, "demo")
    model.train().to(device)
    size = int(cfg["model"]["transform"]["min_size"]), int(cfg["model"]["transform"]["max_size"])
    images, targets = [], []
    for seed, cell_type in enumerate(("shsy5y", "astro")):
        sample = synth_image(cell_type, *size, rng=seed)
        images.append(
            torch.from_numpy(sample.image).float().div(255).expand(3, -1, -1).contiguous().to(device)
        )
        target = {
            "boxes": torch.tensor(
                np.stack([i.box() for i in sample.instances]), dtype=torch.float32, device=device
            ),
            "labels": torch.full((len(sample),), CLASS_TO_LABEL[cell_type], dtype=torch.int64, device=device),
        }
        if cfg["model"]["type"] == "cascade_mask_rcnn":
            target["masks"] = torch.from_numpy(sample.masks()).to(torch.uint8).to(device)
        targets.append(target)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(steps + 1):
        _sync(device)
        start = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _sync(device)
        if step:  # the first step pays one-off allocations
            times.append(time.perf_counter() - start)
    return {"train_step_s": statistics.median(times), "peak_rss_mb": _peak_rss_mb(), "size": list(size)}


def _run_worker(kind: str, name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--name", name, "--device", args.device]
    cmd += ["--repeats", str(args.repeats), "--steps", str(args.steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{kind} worker for {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes per branch")
    parser.add_argument("--steps", type=int, default=5, help="timed demo training steps per branch")
    parser.add_argument("--worker", choices=("forward", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "forward":
        print(json.dumps(worker_forward(args.name, args.device, args.repeats)))
        return
    if args.worker == "train":
        print(json.dumps(worker_train(args.name, args.device, args.steps)))
        return

    import torch

    print(f"device: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"image: {IMAGE.name} (520x704), paper profile, random weights, median of {args.repeats}")
    reference = _run_worker("forward", REFERENCE, args)
    print(f"{REFERENCE:34s} forward {reference['forward_s']:7.3f} s  (ratio 1.00)")
    for name in BRANCHES:
        fwd = _run_worker("forward", name, args)
        train = _run_worker("train", name, args)
        print(
            f"{name:34s} forward {fwd['forward_s']:7.3f} s  (ratio {fwd['forward_s'] / reference['forward_s']:.2f} "
            f"vs maskrcnn_resnet50_fpn) | demo train step {train['train_step_s']:.3f} s "
            f"(batch 2, {train['size'][0]}x{train['size'][1]}), peak RSS {train['peak_rss_mb']:.0f} MB "
            f"(paper forward {fwd['peak_rss_mb']:.0f} MB)"
        )


if __name__ == "__main__":
    main()
