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

The helpers above ``kaggle_layout`` (deadline, the JSON record, progress lines, signals, device
and data choice) are shared with ``benchmarks/gpu_real.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "sartorius_real"
CONFIGS = ROOT / "configs"
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
SMOKE_MINUTES = 0.75
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
SETUP_ENV = "CELLMASK_GPU_SETUP"
"""What ``gpu_check.sh`` / ``gpu_real.sh`` installed or fell back to (recorded in the JSON)."""


# --------------------------------------------------------------------------- shared helpers
class Stopped(BaseException):
    """SIGTERM or SIGINT arrived (a ``timeout``, the device tool, Ctrl-C): the run records what
    it has and ends. A ``BaseException``, so an item's ``except Exception`` does not swallow it."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Stopped` while active (previous handlers restored)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name)

    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


class Deadline:
    """The run's wall-clock budget, counted from ``start`` (``time.monotonic()``)."""

    def __init__(self, seconds: float, start: float | None = None) -> None:
        self.seconds = float(seconds)
        self.start = time.monotonic() if start is None else float(start)
        self.at = self.start + self.seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self, until: float | None = None) -> float:
        """Seconds left before ``until`` (default: the deadline); negative once past it."""
        return (self.at if until is None else until) - time.monotonic()

    def passed(self, until: float | None = None) -> bool:
        return self.left(until) <= 0


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


class Record:
    """A run's JSON, rewritten whole after every item: written to ``<name>.tmp``, then renamed
    over ``<name>`` (atomic), so a reader, or a run killed at any moment, finds the last
    complete version. Progress lines go to stdout and to ``<stem>.log`` beside it."""

    def __init__(self, path: Path, deadline: Deadline, **head: Any) -> None:
        self.path = Path(path)
        self.deadline = deadline
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.path.with_suffix(".log")
        self.log.write_text("")
        self.data: dict[str, Any] = {
            "status": "running",
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": deadline.seconds,
            **head,
            "skipped": [],
            "errors": [],
        }
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.deadline.elapsed(), 2)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(finite_or_none(self.data), indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def progress(self, text: str) -> None:
        line = f"[{self.deadline.elapsed():6.1f} s, {max(self.deadline.left(), 0):5.0f} s left] {text}"
        print(line, flush=True)
        with self.log.open("a") as f:
            f.write(line + "\n")

    def skip(self, item: str, reason: str, detail: str) -> None:
        self.data["skipped"].append({"item": item, "reason": reason, "detail": detail})
        self.save()
        self.progress(f"{item}: SKIPPED ({reason}): {detail}")

    def error(self, item: str, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        tail = traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:]
        self.data["errors"].append({"item": item, "error": text, "traceback": "".join(tail)})
        self.save()
        self.progress(f"{item}: ERROR {text}")

    def finish(self, status: str) -> None:
        """``status``: ``complete``, ``partial`` (items skipped for time), ``errors``,
        ``interrupted: SIGTERM`` ...; ``finished`` true."""
        self.data["status"] = status
        self.data["finished"] = True
        self.save()
        self.progress(f"status: {status}; written: {self.path}")

    def final_status(self) -> str:
        if self.data["errors"]:
            return "errors"
        if self.data["skipped"]:
            return f"partial: {len(self.data['skipped'])} item(s) skipped"
        return "complete"


def default_out() -> Path:
    """``$OUT`` when set (the device tool returns the files written there), else ``benchmarks/gpu``."""
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "gpu"


def data_root(arg: str | None) -> Path:
    """``--data`` (a Kaggle-layout root), else the repository's real fixtures (6 annotated images,
    3 test images).

    Raises:
        FileNotFoundError: the root lacks ``train.csv`` or ``train/`` (the message says how to
            download the data).
    """
    root = Path(arg) if arg else FIXTURES
    missing = [p.name for p in (root / "train.csv", root / "train") if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"{root}: not the competition data in the Kaggle layout (missing {', '.join(missing)}); "
            "download it with `python -m cellmask.kaggle download-data --dir DIR` (make data) and "
            "pass --data DIR, or leave --data out for the repository's fixtures"
        )
    return root.resolve()


def add_common_arguments(parser: argparse.ArgumentParser, minutes: float, work: str) -> None:
    """``--device``, ``--smoke``, ``--profile``, ``--data``, ``--minutes``, ``--out``, ``--work``,
    ``--workers`` (both scripts)."""
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cuda", "cpu"), help="default: cuda when available"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="the smoke profile (the default without CUDA): the code paths"
    )
    parser.add_argument(
        "--profile",
        default=None,
        choices=("paper", "demo", "cpu", "smoke"),
        help="config profile (default: paper on CUDA, smoke with --smoke or without CUDA)",
    )
    parser.add_argument(
        "--data", default=None, help="Kaggle-layout root (default: tests/fixtures/sartorius_real)"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help=f"the whole run's budget, validations and scoring included (default {minutes:g}; "
        f"{SMOKE_MINUTES:g} with the smoke profile)",
    )
    parser.add_argument("--out", default=None, help="the JSON and log (default: $OUT, else benchmarks/gpu)")
    parser.add_argument("--work", default=str(ROOT / "build" / work), help="runs and data layout")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the config's)")


def resolve_run(args: argparse.Namespace, default_minutes: float) -> tuple[Any, str, str]:
    """``(device, profile, mode)`` from ``--device``/``--smoke``/``--profile``; sets
    ``args.minutes`` when not given. ``mode`` says why (for the JSON).

    Raises:
        SystemExit(2): ``--device cuda`` without a CUDA device.
    """
    import torch

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("no CUDA device (leave --device out, or use --smoke, to check the code paths on the CPU)")
        raise SystemExit(2)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu")
    if args.profile:
        profile, mode = args.profile, f"profile {args.profile} as asked"
    elif args.smoke:
        profile, mode = "smoke", "--smoke: the smoke profile"
    elif device.type == "cpu":
        profile, mode = "smoke", "no CUDA: the smoke profile on the CPU (the code paths, not GPU figures)"
    else:
        profile, mode = "paper", "CUDA: the paper profile"
    if args.minutes is None:
        args.minutes = SMOKE_MINUTES if profile == "smoke" else default_minutes
    if not args.minutes > 0:
        raise SystemExit(f"--minutes must be > 0, got {args.minutes}")
    return device, profile, mode


def device_info(device: Any) -> dict[str, Any]:
    """torch, CUDA and the accelerator (name, memory, capability, bf16, driver)."""
    import torch

    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "python": sys.executable,
        "setup": os.environ.get(SETUP_ENV, "run directly (not through the .sh: nothing installed)"),
    }
    if device.type != "cuda":
        info["name"] = "cpu"
        info["threads"] = torch.get_num_threads()
        return info
    props = torch.cuda.get_device_properties(device)
    info.update(
        name=props.name,
        memory_gb=round(props.total_memory / (1 << 30), 2),
        capability=f"{props.major}.{props.minor}",
        multiprocessors=props.multi_processor_count,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        bf16=torch.cuda.is_bf16_supported(),
    )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["driver"] = smi.stdout.strip() or None
    return info


def preload(modules: list[str]) -> float:
    """Import ``modules`` now (seconds taken): the budget's shares then start after the imports,
    and a missing package fails the run at once, by name.

    Raises:
        ImportError: the first module that cannot be imported (the message says how to carry it).
    """
    import importlib

    start = time.monotonic()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(
                f"{name} cannot be imported ({exc}): run through benchmarks/gpu_check.sh or gpu_real.sh "
                "(make setup, else the system python plus the wheels of .whl/: `bash "
                "benchmarks/gpu_check.sh --fetch-wheels` where pip reaches PyPI, then carry .whl)"
            ) from exc
    return time.monotonic() - start


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_settings(tcfg: dict[str, Any], device: Any, tune: bool = True) -> tuple[bool, str | None, bool]:
    """``(autocast on, its dtype's name or None, GradScaler on)`` as the engine decides them
    (``train.amp`` on CUDA only; ``amp_dtype: auto`` -> bfloat16 where the GPU has it); with
    ``tune``, the cuDNN autotuner set as ``cellmask train`` sets it."""
    import torch

    amp = bool(tcfg.get("amp")) and device.type == "cuda"
    try:
        from cellmask.engine.amp import amp_dtype, needs_scaler, tune_backends
    except ImportError:  # an engine without the amp module: the dtype is named in the config
        dtype = getattr(torch, str(tcfg.get("amp_dtype") or "float16"))
        return amp, str(dtype).removeprefix("torch.") if amp else None, amp and dtype == torch.float16
    if tune:
        tune_backends(device, fixed_size=True)
    dtype = amp_dtype(tcfg.get("amp_dtype"), device)
    return amp, str(dtype).removeprefix("torch.") if amp else None, needs_scaler(amp, dtype, device)


def free_memory(device: Any) -> None:
    """Collect garbage and give cached CUDA blocks back (between models, after an error)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_figures(device: Any) -> dict[str, Any]:
    """``peak_gb`` (CUDA: max allocated since the last reset; CPU: the process's peak RSS) and,
    on CUDA, ``peak_reserved_gb``."""
    import torch

    from cellmask.engine.memory import GB, peak_memory_gb

    out: dict[str, Any] = {"peak_gb": peak_memory_gb(device)}
    if device.type == "cuda":
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB
    else:
        out["peak_kind"] = "process peak RSS (CPU)"
    return out


# --------------------------------------------------------------------------- gpu_check itself
def kaggle_layout(source: Path, out: Path, test_images: int) -> Path:
    """A Kaggle-layout root in ``out`` for ``source``: ``train.csv``, ``train/``, the first
    ``test_images`` images of ``test/`` (the fixtures' train images when it has none) and
    ``train_semi_supervised/`` (``source``'s, else its test and training images, unlabeled).
    Folders and images are symbolic links."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(source / "train.csv", out / "train.csv")
    (out / "train").symlink_to(source / "train", target_is_directory=True)
    pngs = sorted((source / "test").glob("*.png")) or sorted((source / "train").glob("*.png"))
    (out / "test").mkdir()
    for image in pngs[:test_images]:
        (out / "test" / image.name).symlink_to(image)
    if (source / "train_semi_supervised").is_dir():
        (out / "train_semi_supervised").symlink_to(source / "train_semi_supervised", target_is_directory=True)
    else:
        semi = out / "train_semi_supervised"
        semi.mkdir()
        for image in sorted((source / "test").glob("*.png")) + sorted((source / "train").glob("*.png")):
            (semi / image.name).symlink_to(image)
    with (out / "sample_submission.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "predicted"])
        writer.writerows([p.stem, ""] for p in sorted((out / "test").glob("*.png")))
    return out


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
