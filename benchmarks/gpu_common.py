"""What ``benchmarks/gpu_check.py`` and ``benchmarks/gpu_real.py`` share: the global deadline,
the JSON record written as it goes, progress lines, signals, and the device and data choice.
Imported by the two drivers as a sibling script (``import gpu_common``: a script's own folder is
on ``sys.path``)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
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


SMOKE_MINUTES = 0.75


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
