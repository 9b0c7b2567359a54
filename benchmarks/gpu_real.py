"""GPU run on the real data: one branch and the segmenter trained for a fixed wall-clock budget
each, then scored on held-out competition images.

On a Kaggle-layout root of the competition data (``--data``; default ``$CELLMASK_DATA``, else
``../shared/sartorius`` next to the repository):

* splits the annotated images 80/10/10 (``train.val_fraction=0.1``,
  ``train.holdout_fraction=0.1``: :func:`cellmask.training.split.competition_split`, grouped by sample
  and stratified by cell type; on a root with few sample groups the fractions grow, as there);
* trains Faster R-CNN Swin-T (``configs/faster_rcnn_swin_t.yaml``), then the segmenter
  (``configs/segmenter_upernet_swin_t.yaml``), each with :func:`cellmask.training.command.run_training`
  (``--profile``, paper by default: AMP on) for ``--minutes`` of wall clock
  (``train.max_hours``: the run stops after the step that passes it, validated and saved).
  Backbones start from random weights (nothing is downloaded) unless ``--pretrained``;
* scores that branch + the segmenter (:class:`cellmask.predict.Predictor`, flip TTA + WBF, the
  default predict options) on the held-out images with the competition metric
  (:func:`cellmask.evaluate.evaluate_predictor`).

Prints, per model, the steps done, the time per training step (the runs' ``metrics.csv`` epoch
times less the validation time, over the ``steps.csv`` rows: data loading and the first, slow
steps included) and the peak accelerator memory (``torch.cuda.max_memory_allocated``; on a CPU
the process's peak RSS so far), then the held-out score overall and per class; writes them to
``OUT/gpu_real.json``. The runs stay under ``OUT/runs``, the scoring files under ``OUT/holdout``.

    python benchmarks/gpu_real.py [--data ROOT] [--minutes 3] [--out runs/gpu_real]
    python benchmarks/gpu_real.py --device cpu --profile smoke --minutes 0.3 \\
        --data tests/fixtures/sartorius_real            # the code paths, on a CPU

``benchmarks/gpu_real.sh`` runs it on a CUDA machine with a time limit (about 8 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cellmask.engine.memory import peak_memory_gb, reset_peak

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEFAULT_DATA = ROOT.parent / "shared" / "sartorius"
BRANCH = "faster_rcnn_swin_t"
SEGMENTER = "segmenter_upernet_swin_t"
SPLIT = ["train.val_fraction=0.1", "train.holdout_fraction=0.1"]


def data_root(arg: str | None) -> Path:
    """``--data``, else ``$CELLMASK_DATA``, else ``../shared/sartorius`` beside the repository.

    Raises:
        FileNotFoundError: the root lacks ``train.csv`` or ``train/`` (the message says how to
            download the data).
    """
    root = Path(arg or os.environ.get("CELLMASK_DATA") or DEFAULT_DATA)
    missing = [p.name for p in (root / "train.csv", root / "train") if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"{root}: not the competition data in the Kaggle layout (missing {', '.join(missing)}); "
            "download it with `python -m cellmask.kaggle download-data --dir DIR` (make data) and "
            "pass --data DIR or set CELLMASK_DATA"
        )
    return root


@contextlib.contextmanager
def timed_validation(seconds: list[float]) -> Iterator[None]:
    """While active, every ``val_fn`` the training parts builders return appends its wall time
    to ``seconds`` (so the training time of an epoch is its ``time_s`` less those)."""
    import cellmask.training.command as train

    original = train.parts_builder

    def timing_builder(cfg: dict[str, Any]) -> Any:
        build = original(cfg)

        def parts(*args: Any) -> tuple[Any, Any, Any]:
            model, loader, val_fn = build(*args)
            if val_fn is None:
                return model, loader, None

            def timed(m: Any, epoch: int, info: Any) -> Any:
                start = time.perf_counter()
                try:
                    return val_fn(m, epoch, info)
                finally:
                    seconds.append(time.perf_counter() - start)

            return model, loader, timed

        return parts

    train.parts_builder = timing_builder
    try:
        yield
    finally:
        train.parts_builder = original


def load(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The config ``name`` under ``--profile`` with the split, the budget and ``--set`` applied."""
    from cellmask.config import load_config

    overrides = [*SPLIT, f"train.max_hours={args.minutes / 60:.9e}"]  # 1e-05 (no dot) is a YAML string
    if not args.pretrained:
        overrides.append("model.backbone.pretrained=false")
    if args.workers is not None:
        overrides.append(f"train.num_workers={args.workers}")
    return load_config(
        CONFIGS / f"{name}.yaml", profile=args.profile, overrides=[*overrides, *args.overrides]
    )


def train(name: str, root: Path, runs: Path, device: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``name`` for the budget; its figures (steps, s/step, peak memory, losses)."""
    from cellmask.engine.history import read_rows_csv
    from cellmask.training.command import run_training

    cfg = load(name, args)
    out_dir = runs / name
    if out_dir.exists():  # this script's own run of an earlier call: a fresh run, fresh logs
        shutil.rmtree(out_dir)
    val_seconds: list[float] = []
    reset_peak(device)
    start = time.perf_counter()
    with timed_validation(val_seconds):
        result = run_training(cfg, root, "sartorius", out_dir, device=device.type)
    seconds = time.perf_counter() - start
    history = result["history"]
    steps = [r for r in read_rows_csv(out_dir / "steps.csv") if r["rank"] == "0"]
    epoch_seconds = sum(float(row["time_s"]) for row in history)
    train_seconds = max(epoch_seconds - sum(val_seconds), 0.0)
    losses = [float(r["loss"]) for r in steps if r["skipped"] == "0"]
    best = result.get("best")
    return {
        "model": name,
        "run_dir": str(out_dir),
        "steps": len(steps),
        "epochs": len(history),
        "stopped": result.get("stopped"),
        "s_per_step": train_seconds / len(steps) if steps else math.nan,
        "train_s": train_seconds,
        "val_s": sum(val_seconds),
        "wall_s": seconds,
        "peak_gb": peak_memory_gb(device),
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "skipped_steps": sum(r["skipped"] != "0" for r in steps),
        "finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "best": dict(best) if best else None,
        "batch": int(cfg["train"]["batch_size"]),
        "amp": bool(cfg["train"]["amp"]) and device.type == "cuda",
    }


def score(root: Path, runs: Path, out: Path, device: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The branch + segmenter on the held-out images: the competition metric's report."""
    from cellmask.evaluate import evaluate_predictor
    from cellmask.predict import Predictor
    from cellmask.training.split import competition_split

    holdout = competition_split(load(BRANCH, args), root).holdout
    if not holdout:
        raise ValueError(f"{root}: the held-out split is empty (too few sample groups)")
    reset_peak(device)
    predictor = Predictor.from_runs([runs / BRANCH], runs / SEGMENTER, device=device.type)
    result = evaluate_predictor(predictor, holdout, out, ablation=False, split="holdout", progress=False)
    report = result.report.to_dict()
    return {
        "score": report["score"],
        "per_class": report["per_class"],
        "class_counts": report["class_counts"],
        "per_threshold": report["per_threshold"],
        "n_images": report["n_images"],
        "images": [r.image_id for r in holdout],
        "s_per_image": result.seconds / max(len(holdout), 1),
        "peak_gb": peak_memory_gb(device),
    }


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=None, help="Kaggle-layout root (default: $CELLMASK_DATA or ../shared/sartorius)"
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--profile", default="paper", choices=("paper", "demo", "cpu", "smoke"))
    parser.add_argument(
        "--minutes", type=float, default=3.0, help="training budget of each model (default 3)"
    )
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the config's)")
    parser.add_argument(
        "--pretrained", action="store_true", help="keep the configs' ImageNet weights (downloads)"
    )
    parser.add_argument(
        "--out", default=str(ROOT / "runs" / "gpu_real"), help="runs, scores and gpu_real.json"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (both models)",
    )
    args = parser.parse_args(argv)
    if not args.minutes > 0:
        parser.error(f"--minutes must be > 0, got {args.minutes}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_real: no CUDA device (use --device cpu --profile smoke to check the code paths)")
        return 2
    root = data_root(args.data)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device: {name}, torch {torch.__version__}; data {root}; {args.minutes:g} min per model", flush=True
    )
    out = Path(args.out)
    runs = out / "runs"
    from cellmask.training.split import competition_split

    split = competition_split(load(BRANCH, args), root)
    started = time.perf_counter()
    rows = []
    for model in (BRANCH, SEGMENTER):
        row = train(model, root, runs, device, args)
        rows.append(row)
        print(
            f"{model:28s} {row['steps']:5d} steps in {row['epochs']} epoch(s), {row['s_per_step']:.3f} s/step, "
            f"peak {row['peak_gb']:.2f} GB, loss {row['first_loss']:.3f} -> {row['last_loss']:.3f} "
            f"({'finite' if row['finite'] else 'NON-FINITE'}, batch {row['batch']}, amp {row['amp']}, "
            f"stopped: {row['stopped']})",
            flush=True,
        )
    holdout = score(root, runs, out / "holdout", device, args)
    classes = ", ".join(
        f"{k} {'n/a' if v is None else f'{v:.4f}'} ({holdout['class_counts'].get(k, 0)})"
        for k, v in holdout["per_class"].items()
    )
    print(
        f"holdout score {holdout['score']:.4f} over {holdout['n_images']} images ({classes}); "
        f"{holdout['s_per_image']:.2f} s/image, peak {holdout['peak_gb']:.2f} GB"
    )
    result = {
        "device": name,
        "torch": torch.__version__,
        "profile": args.profile,
        "data": str(root),
        "minutes_per_model": args.minutes,
        "split": {k: len(v) for k, v in split._asdict().items()},
        "train": rows,
        "holdout": holdout,
        "total_s": time.perf_counter() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_real.json").write_text(json.dumps(finite_or_none(result), indent=2, default=str) + "\n")
    print(f"written: {out / 'gpu_real.json'}")
    ok = all(r["finite"] for r in rows) and holdout["score"] is not None and math.isfinite(holdout["score"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
