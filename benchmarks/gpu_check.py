"""GPU check: a few paper-profile training steps of every branch and the segmenter with AMP,
then the ensemble's inference on the fixture test images.

For each model of the method (the four branches, the Cascade Mask R-CNN baseline and the
segmenter's competition stage), on the real fixture images laid out as Kaggle mounts them:

* builds it from its config (``--profile``, paper by default; random init: ``pretrained`` off,
  nothing is downloaded) with the parts builder ``cellmask train`` uses (same datasets,
  augmentations, loaders, AMP and optimiser);
* runs ``--warmup`` steps, then ``--steps`` timed steps through the engine's
  :func:`~cellmask.engine.train_one_epoch` (autocast + GradScaler on CUDA when ``train.amp``);
* records the time per step, the peak accelerator memory (``torch.cuda.max_memory_allocated``;
  on a CPU the process's peak RSS so far, a rough upper bound), the mean loss and whether any
  step was skipped for a non-finite loss;
* saves the model as a run directory (``config.yaml`` + ``best.pt``).

Then the ensemble (:func:`cellmask.predict.predict_folder`, flip TTA + WBF + segmenter) predicts
the fixture test images with those runs (AMP at inference with ``--amp-inference``): seconds per
image by stage and the peak memory, and the submission is checked. Prints one table and writes
``gpu_check.json``.

    python benchmarks/gpu_check.py [--device cuda] [--profile paper] [--steps 5] [--out DIR]
    python benchmarks/gpu_check.py --device cpu --profile smoke      # the code paths, on a CPU

``benchmarks/gpu_check.sh`` runs it on a CUDA machine with a time limit.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cellmask.engine.memory import peak_memory_gb, reset_peak

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "sartorius_real"
CONFIGS = ROOT / "configs"
MODELS = [
    "faster_rcnn_swin_t",
    "cascade_rcnn_resnext101",
    "cascade_rcnn_resnest101",
    "soft_teacher_resnext101",
    "cascade_mask_rcnn_resnext101",
    "segmenter_upernet_swin_t_finetune",
]
BASELINE = "cascade_mask_rcnn_resnext101"


def kaggle_layout(out: Path) -> Path:
    """A Kaggle-layout root from the real fixtures: ``train.csv``, ``train/``, ``test/`` and
    ``train_semi_supervised/`` (the test images and the training images, unlabeled)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / "train.csv", out / "train.csv")
    for name in ("train", "test"):
        shutil.copytree(FIXTURES / name, out / name, dirs_exist_ok=True)
    semi = out / "train_semi_supervised"
    semi.mkdir(exist_ok=True)
    for image in sorted((FIXTURES / "test").glob("*.png")) + sorted((FIXTURES / "train").glob("*.png")):
        shutil.copy(image, semi / image.name)
    with (out / "sample_submission.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "predicted"])
        writer.writerows([p.stem, ""] for p in sorted((out / "test").glob("*.png")))
    return out


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(
    name: str, profile: str, root: Path, runs: Path, device: Any, args: argparse.Namespace
) -> dict:
    """Build ``name`` as ``cellmask train`` would, run warm-up + timed steps, save it as a run."""
    import torch

    from cellmask.config import load_config, save_config
    from cellmask.engine import DistInfo, build_optimizer, save_checkpoint, train_one_epoch
    from cellmask.training.parts import parts_builder
    from cellmask.training.split import load_split

    overrides = ["model.backbone.pretrained=false", f"train.num_workers={args.workers}"]
    cfg = load_config(CONFIGS / f"{name}.yaml", profile=profile, overrides=overrides)
    train_records, val_records, classes = load_split(cfg, root, "sartorius")
    out_dir = runs / name
    cfg["data"] = {"dataset": "sartorius", "root": str(root), "classes": list(classes)}
    cfg["data"]["num_classes"] = len(classes) + 1
    cfg["run"] = {"out_dir": str(out_dir)}
    info = DistInfo(device=device)
    model, loader, _ = parts_builder(cfg)(cfg, train_records, val_records, len(classes) + 1, info)
    model.to(device)
    optimizer = build_optimizer(cfg, model)
    amp = bool(cfg["train"].get("amp")) and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp and cfg["train"].get("amp_dtype") == "float16")
    batches = itertools.cycle(loader)

    def run(n: int) -> dict:
        return train_one_epoch(
            model, [next(batches) for _ in range(n)], optimizer, None, scaler, device=device, cfg=cfg
        )

    reset_peak(device)
    warm = run(args.warmup)
    sync(device)
    start = time.perf_counter()
    timed = run(args.steps)
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    skipped = int(warm["skipped_steps"] + timed["skipped_steps"])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    save_checkpoint({"model": model.state_dict(), "config": cfg, "epoch": 0}, out_dir / "best.pt")
    row = {
        "model": name,
        "s_per_step": seconds,
        "peak_gb": peak_memory_gb(device),
        "loss": timed["loss"],
        "finite": skipped == 0 and math.isfinite(timed["loss"]),
        "skipped_steps": skipped,
        "batch": int(cfg["train"]["batch_size"]),
        "amp": amp,
    }
    return row


def inference(root: Path, runs: Path, device: Any, args: argparse.Namespace) -> dict:
    """The ensemble over the trained branches (not the baseline) on ``root/test``."""
    from cellmask.predict import predict_folder

    branches = [runs / m for m in MODELS if m != BASELINE and "segmenter" not in m and (runs / m).is_dir()]
    segmenter = runs / MODELS[-1]
    overrides = [f"predict.amp={'true' if args.amp_inference else 'false'}"]
    reset_peak(device)
    result = predict_folder(
        root / "test",
        branches,
        segmenter,
        runs / "submission.csv",
        device=device.type,
        overrides=overrides,
        progress=False,
    )
    n = max(len(result.instances), 1)
    return {
        "images": len(result.instances),
        "instances": sum(result.instances.values()),
        "s_per_image": result.seconds / n,
        "stages_s_per_image": {k: v / n for k, v in result.timings.items()},
        "peak_gb": peak_memory_gb(device),
        "submission_ok": not result.problems,
        "problems": result.problems,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--profile", default="paper", choices=("paper", "demo", "smoke"))
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--amp-inference", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=None, help="keep the runs and gpu_check.json here")
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu --profile smoke to check the code paths)")
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    root = kaggle_layout(out / "data")
    runs = out / "runs"
    rows = []
    for name in args.models:
        row = train_steps(name, args.profile, root, runs, device, args)
        rows.append(row)
        print(
            f"{name:36s} {row['s_per_step']:7.3f} s/step  peak {row['peak_gb']:6.2f} GB  "
            f"loss {row['loss']:.3f}  {'finite' if row['finite'] else 'NON-FINITE'}  "
            f"(batch {row['batch']}, amp {row['amp']})",
            flush=True,
        )
    result = {"device": str(device), "profile": args.profile, "train": rows}
    if (runs / MODELS[-1]).is_dir():
        result["inference"] = inf = inference(root, runs, device, args)
        stages = ", ".join(f"{k} {v:.2f}" for k, v in inf["stages_s_per_image"].items())
        print(
            f"ensemble inference: {inf['s_per_image']:.2f} s/image over {inf['images']} images "
            f"({inf['instances']} instances), peak {inf['peak_gb']:.2f} GB, submission "
            f"{'OK' if inf['submission_ok'] else 'INVALID'}\n  per stage (s/image): {stages}"
        )
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out / 'gpu_check.json'}")
    bad = [r["model"] for r in rows if not r["finite"]]
    if bad:
        print(f"non-finite losses: {', '.join(bad)}")
    return 1 if bad or not result.get("inference", {}).get("submission_ok", True) else 0


if __name__ == "__main__":
    sys.exit(main())
