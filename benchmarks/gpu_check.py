"""GPU check: a few paper-profile AMP training steps of every branch, the baseline and the
segmenter, then the ensemble's inference on the test images, within a global deadline.

For each model of the method (the four branches, the Cascade Mask R-CNN baseline and the
segmenter's competition stage), on the annotated images of ``--data`` (a Kaggle-layout root;
default: the repository's real fixtures, ``tests/fixtures/sartorius_real``):

* builds it from its config (``--profile``, paper by default; random init: ``pretrained`` off,
  nothing is downloaded) with the parts builder ``cellmask train`` uses (same datasets,
  augmentations, loaders, AMP and optimiser);
* runs ``--warmup`` steps, then up to ``--steps`` timed steps, one at a time through the engine's
  :func:`~cellmask.engine.train_one_epoch` (autocast + GradScaler on CUDA when ``train.amp``);
* records steps/s (the batch already loaded: compute only; the loading time apart), the peak
  accelerator memory (``torch.cuda.max_memory_allocated``; on a CPU the process's peak RSS so
  far, a rough upper bound), the AMP dtype (``train.amp_dtype: auto``: bfloat16 where the GPU
  has it, without a GradScaler), the mean loss, whether every loss stayed finite, and
  the steps whose AMP gradients overflowed (the scaler lowered its scale);
* saves the branches and the segmenter as run directories (``config.yaml`` + ``best.pt``).

Then the ensemble (:class:`cellmask.predict.Predictor`: the trained branches, flip TTA, WBF, the
segmenter; AMP at inference unless ``--no-amp-inference``) predicts the test images image by
image, ``--infer-passes`` times: ms/image (the first image apart: it pays the warm-up), per stage,
the peak memory, the instances found, and the submission of the first whole pass checked.
Random-init models after a few steps find boxes unlike trained ones: read ms/image with the
instance counts beside it.

**Deadline.** ``--minutes`` (default 3.5; 0.75 with the smoke profile) is the whole run's budget,
counted from the start: training gets what the inference's reserve (``--reserve``, 30%) leaves,
shared equally among the models not yet run; each model runs one warm-up and one timed step
whatever the time, then stops between steps when its share is spent; a model whose turn comes
after the training time is skipped, and the inference stops between images at the deadline. Whatever was skipped is listed in the JSON
(``skipped``, reason ``time``).

**Written as it goes.** ``OUT/gpu_check.json`` is rewritten after every measured item (a model,
an image of the inference) to a temporary file renamed over it, so a run cut at any moment (the
command's limit, SIGKILL) leaves a valid JSON with every figure measured so far (``status``:
``running`` until the end; ``interrupted`` on SIGTERM/SIGINT). One progress line per item is
printed and appended to ``OUT/gpu_check.log``. A model that fails (out of memory, say) is
recorded under ``errors`` and the run goes on.

``OUT`` is ``--out``, else ``$OUT`` (the device tool returns what is written there), else
``benchmarks/gpu/``; the runs and the data layout go to ``--work`` (default ``build/gpu_check``,
ignored by git: checkpoints must not travel with the working tree).

Without CUDA (or with ``--smoke``) the same code paths run with the smoke profile, on the CPU in
well under a minute.

    python benchmarks/gpu_check.py [--minutes 3.5] [--data ROOT] [--out DIR]      # a CUDA machine
    python benchmarks/gpu_check.py --smoke                                        # the code paths

``benchmarks/gpu_check.sh`` installs what is needed first (``make setup``, else the system
python) and runs it under a backstop timeout.

The helpers (deadline, the JSON record, progress lines, signals, device and data choice) are in
``benchmarks/gpu_common.py``, shared with ``benchmarks/gpu_real.py``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from gpu_common import (  # the sibling script (this script's folder is on sys.path)
    CONFIGS,
    Deadline,
    Record,
    Stopped,
    add_common_arguments,
    amp_settings,
    data_root,
    default_out,
    device_info,
    free_memory,
    kaggle_layout,
    memory_figures,
    preload,
    resolve_run,
    stop_on_signals,
    sync,
)

BRANCHES = [
    "faster_rcnn_swin_t",
    "cascade_rcnn_resnext101",
    "cascade_rcnn_resnest101",
    "soft_teacher_resnext101",
]
BASELINE = "cascade_mask_rcnn_resnext101"
SEGMENTER = "segmenter_upernet_swin_t_finetune"
MODELS = [*BRANCHES, BASELINE, SEGMENTER]
DEFAULT_MINUTES = 3.5
IMPORTS = [
    "cellmask.engine",
    "cellmask.training.parts",
    "cellmask.training.split",
    "cellmask.training.soft_teacher",
    "cellmask.models",
    "cellmask.predict",
    "cellmask.submission",
    "segmentation_models_pytorch",
    "ensemble_boxes",
]
"""What the check imports before its budget is shared out (:func:`preload`)."""


def train_steps(
    name: str, profile: str, root: Path, runs: Path, device: Any, args: argparse.Namespace, until: float
) -> dict[str, Any]:
    """Build ``name`` as ``cellmask train`` would, run warm-up then timed steps (one at a time,
    none started after ``until`` but the first), save it as a run when the ensemble uses it."""
    import torch

    from cellmask.config import load_config, save_config
    from cellmask.engine import DistInfo, TrainStep, build_optimizer, save_checkpoint, train_one_epoch
    from cellmask.engine.memory import reset_peak
    from cellmask.training.parts import parts_builder
    from cellmask.training.split import load_split

    started = time.monotonic()
    overrides = ["model.backbone.pretrained=false"]
    if args.workers is not None:
        overrides.append(f"train.num_workers={args.workers}")
    cfg = load_config(CONFIGS / f"{name}.yaml", profile=profile, overrides=overrides)
    train_records, val_records, classes = load_split(cfg, root, "sartorius")
    out_dir = runs / name
    cfg["data"] = {"dataset": "sartorius", "root": str(root), "classes": list(classes)}
    cfg["data"]["num_classes"] = len(classes) + 1
    cfg["run"] = {"out_dir": str(out_dir)}
    reset_peak(device)
    info = DistInfo(device=device)
    model, loader, _ = parts_builder(cfg)(cfg, train_records, val_records, len(classes) + 1, info)
    model.to(device)
    optimizer = build_optimizer(cfg, model)
    tcfg = cfg["train"]
    amp, amp_dtype, use_scaler = amp_settings(tcfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    step = TrainStep(model)
    batches = iter(itertools.cycle(loader))
    build_s = time.monotonic() - started

    def one() -> tuple[float, float, dict[str, float], bool]:
        """(load s, step s, stats, AMP overflow) of one step."""
        loaded = time.perf_counter()
        batch = next(batches)
        sync(device)
        start = time.perf_counter()
        scale = scaler.get_scale() if scaler.is_enabled() else 0.0
        stats = train_one_epoch(step, [batch], optimizer, None, scaler, device=device, cfg=cfg)
        sync(device)
        end = time.perf_counter()
        overflow = scaler.is_enabled() and scaler.get_scale() < scale
        return start - loaded, end - start, stats, overflow

    # one warm-up and one timed step whatever the time; the others while ``until`` is ahead
    warm, timed, cut = [one()], [], False
    for _ in range(1, args.warmup):
        if time.monotonic() >= until:
            cut = True
            break
        warm.append(one())
    for k in range(max(args.steps, 1)):
        if k and (cut or time.monotonic() >= until):
            cut = True
            break
        timed.append(one())
    steps = warm + timed
    losses = [s[2]["loss"] for s in steps]
    skipped = int(sum(s[2]["skipped_steps"] for s in steps))
    per_step = sum(s[1] for s in timed) / len(timed)
    row: dict[str, Any] = {
        "model": name,
        "steps_per_s": 1.0 / per_step,
        "s_per_step": per_step,
        "timed_steps": len(timed),
        "warmup_steps": len(warm),
        "first_step_s": warm[0][1],
        "load_s_per_step": sum(s[0] for s in steps) / len(steps),
        **memory_figures(device),
        "amp": amp,
        "amp_dtype": amp_dtype,
        "grad_scaler": use_scaler,
        "amp_overflow_steps": sum(s[3] for s in steps),
        "finite": skipped == 0 and all(math.isfinite(x) for x in losses),
        "skipped_steps": skipped,
        "loss": sum(s[2]["loss"] for s in timed) / len(timed),
        "batch": int(tcfg["batch_size"]),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "build_s": build_s,
        "cut_for_time": cut,
    }
    if name != BASELINE:  # the ensemble's runs
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        save_checkpoint({"model": model.state_dict(), "config": cfg, "epoch": 0}, out_dir / "best.pt")
    row["wall_s"] = time.monotonic() - started
    return row


def inference(
    root: Path, runs: Path, device: Any, args: argparse.Namespace, record: Record, deadline: Deadline
) -> None:
    """The ensemble (the trained branches + the segmenter) on ``root/test``, image by image,
    ``args.infer_passes`` times, none started after the deadline but the first; ``record`` is
    updated (``inference``) and saved after every image."""
    from cellmask.engine.memory import reset_peak
    from cellmask.predict import Predictor
    from cellmask.predict.images import list_image_records
    from cellmask.submission import check_submission, write_submission

    images = root / "test"
    records = list_image_records(images)
    branches = [runs / m for m in BRANCHES if (runs / m / "best.pt").is_file()]
    reset_peak(device)
    start = time.perf_counter()
    predictor = Predictor.from_runs(
        branches,
        runs / SEGMENTER,
        overrides=[f"predict.amp={'true' if args.amp_inference else 'false'}"],
        device=device.type,
    )
    result: dict[str, Any] = {
        "branches": [b.name for b in predictor.branches],
        "images": len(records),
        "amp": bool(predictor.amp),
        "tta": bool(predictor.options.get("tta")),
        "load_s": time.perf_counter() - start,
        "image_s": [],
        "instances": {},
        "ms_per_image": None,
        "passes_done": 0,
    }
    record.data["inference"] = result
    record.save()
    times: list[list[float]] = []
    for p in range(max(args.infer_passes, 1)):
        predictor.timings.clear()
        times.append([])
        rles: dict[str, list[str]] = {}
        for rec in records:
            if times[0] and deadline.passed():
                left = len(records) - len(times[-1]) + (args.infer_passes - p - 1) * len(records)
                record.skip(
                    f"inference pass {p + 1}",
                    "time",
                    f"deadline reached: {left} image prediction(s) of {args.infer_passes} pass(es) not run",
                )
                return
            begin = time.perf_counter()
            counts: dict[str, int] = {}
            rles.update(predictor.predict_records([rec], progress=False, counts=counts))
            sync(device)
            seconds = time.perf_counter() - begin
            times[-1].append(seconds)
            result["image_s"].append(round(seconds, 4))
            result["instances"].update(counts)
            steady = [t for t in itertools.chain(*times)][1:]  # the very first image pays the warm-up
            result["first_image_s"] = times[0][0]
            result["ms_per_image"] = 1000 * sum(steady) / len(steady) if steady else 1000 * times[0][0]
            result.update(memory_figures(device))
            record.save()
            record.progress(
                f"ensemble pass {p + 1}, image {len(times[-1])}/{len(records)} {rec.image_id}: "
                f"{1000 * seconds:.0f} ms, {counts.get(rec.image_id, 0)} instances"
            )
        result["stages_ms_per_image"] = {k: 1000 * v / len(records) for k, v in predictor.timings.items()}
        result["passes_done"] = p + 1
        if p == 0:
            sub = write_submission(runs / "submission.csv", rles, image_ids=[r.image_id for r in records])
            result["problems"] = check_submission(sub, images)
            result["submission_ok"] = not result["problems"]
        record.save()


def main(argv: list[str] | None = None) -> int:
    began = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, DEFAULT_MINUTES, "gpu_check")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1 is run)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps at most (at least 1 is run)")
    parser.add_argument("--reserve", type=float, default=0.3, help="budget fraction kept for inference")
    parser.add_argument("--infer-passes", type=int, default=2, help="passes over the test images")
    parser.add_argument("--infer-images", type=int, default=8, help="test images at most")
    parser.add_argument("--amp-inference", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    device, profile, mode = resolve_run(args, DEFAULT_MINUTES)
    deadline = Deadline(args.minutes * 60, start=began)
    source = data_root(args.data)
    out = Path(args.out) if args.out else default_out()
    work = Path(args.work)
    record = Record(
        out / "gpu_check.json",
        deadline,
        script="gpu_check",
        device=device_info(device),
        profile=profile,
        mode=mode,
        data=str(source),
        work=str(work),
        args=vars(args),
        train=[],
    )
    record.progress(
        f"gpu_check: {record.data['device']['name']}, {mode}; {args.minutes:g} min; JSON {record.path}"
    )
    runs = work / "runs"
    with stop_on_signals():
        try:
            root = kaggle_layout(source, work / "data", args.infer_images)
            if runs.exists():
                shutil.rmtree(runs)
            check_models(args, device, root, runs, profile, record, deadline)
        except ImportError as exc:
            record.error("imports", exc)
        except Stopped as stop:
            record.finish(f"interrupted: {stop}")
            return 124
    record.finish(record.final_status())
    bad = [r["model"] for r in record.data["train"] if not r["finite"]]
    if bad:
        print(f"non-finite losses: {', '.join(bad)}")
    inf = record.data.get("inference") or {}
    return 1 if bad or record.data["errors"] or inf.get("submission_ok") is False else 0


def check_models(
    args: argparse.Namespace,
    device: Any,
    root: Path,
    runs: Path,
    profile: str,
    record: Record,
    deadline: Deadline,
) -> None:
    """The training items, then the inference item (see the module docstring for the budget)."""
    record.data["import_s"] = preload(IMPORTS)
    ensemble = SEGMENTER in args.models and any(m in BRANCHES for m in args.models)
    train_until = deadline.at - (args.reserve * deadline.seconds if ensemble else 0.0)
    for i, name in enumerate(args.models):
        left = deadline.left(train_until)
        if left <= 0:
            record.skip(name, "time", f"the training time ran out ({-left:.0f} s over its share)")
            continue
        until = time.monotonic() + left / (len(args.models) - i)
        try:
            row = train_steps(name, profile, root, runs, device, args, until)
        except Exception as exc:
            record.error(name, exc)
            free_memory(device)
            continue
        record.data["train"].append(row)
        record.save()
        free_memory(device)
        record.progress(
            f"{name}: {row['timed_steps']} timed + {row['warmup_steps']} warm-up steps, "
            f"{row['s_per_step']:.3f} s/step ({row['steps_per_s']:.2f} steps/s), "
            f"peak {row['peak_gb']:.2f} GB, amp {row['amp_dtype'] or 'off'}, loss {row['loss']:.3f} "
            f"{'finite' if row['finite'] else 'NON-FINITE'}, {row['amp_overflow_steps']} AMP overflow(s)"
            + (", cut for time" if row["cut_for_time"] else "")
        )
    if not ensemble:
        return
    if not (runs / SEGMENTER / "best.pt").is_file() or not any(
        (runs / b / "best.pt").is_file() for b in BRANCHES
    ):
        record.skip("inference", "missing runs", "needs the segmenter and at least one branch trained")
        return
    if deadline.passed():
        record.skip("inference", "time", "the deadline passed before the ensemble's turn")
        return
    try:
        inference(root, runs, device, args, record, deadline)
    except Exception as exc:
        record.error("inference", exc)
        return
    inf = record.data["inference"]
    if inf.get("passes_done"):
        stages = ", ".join(f"{k} {v:.0f}" for k, v in inf["stages_ms_per_image"].items())
        record.progress(
            f"ensemble: {inf['ms_per_image']:.0f} ms/image after a first image of {1000 * inf['first_image_s']:.0f} ms "
            f"({sum(inf['instances'].values())} instances over {inf['images']} images), peak "
            f"{inf['peak_gb']:.2f} GB, submission {'OK' if inf['submission_ok'] else 'INVALID'}; "
            f"per stage (ms/image): {stages}"
        )


if __name__ == "__main__":
    sys.exit(main())
