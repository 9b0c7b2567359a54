""":func:`fit`: a whole training run as named steps over a :class:`Run`: start (or restore),
train one epoch, validate, record, save; and stop early when the wall-clock budget
``train.max_hours`` is spent.

The budget: counted from the start of each :func:`fit` call (a resumed run gets a fresh one) and
checked after every iteration (jointly by every rank under DDP:
:meth:`~cellmask.engine.loop.WallClockBudget.passed`). The iteration that passes it is the last
of the session: the cut epoch's row gets ``stopped="max_hours"`` and ``iters`` (the epoch's
iterations done so far), it is validated whatever ``train.val_every`` says (so ``best.pt``
exists), ``steps.csv``, ``last.pt``, ``epoch_XXX.pt`` and ``metrics.csv`` are written, and
:func:`fit` returns with ``stopped="max_hours"``.

``last.pt`` then records where the run stands inside the epoch (``epoch``: epochs complete,
``iteration``: iterations done of the next) with the RNG states of the moment of the cut (taken
before the cut's validation), and the schedule stays where the iterations left it. A
``resume=True`` run continues with the cut epoch's next batch (the loader's
:class:`~cellmask.engine.loaders.EpochSampler` leaves out the batches done, and every batch
depends only on ``(seed, epoch)``), so a run cut any number of times ends bit-exactly as an
uninterrupted one; the resumed epoch's row replaces the cut row (its ``train_*`` means cover the
iterations of that session, ``resumed_at`` says from which).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from cellmask.config import save_config, to_plain
from cellmask.engine.checkpoints import (
    CheckpointError,
    InitReport,
    load_checkpoint,
    load_init_weights,
    prune_epoch_checkpoints,
    save_checkpoint,
)
from cellmask.engine.defaults import train_config
from cellmask.engine.dist import DistInfo, barrier, gather_objects, init_distributed
from cellmask.engine.history import append_rows_csv, keep_epochs_csv, plot_metrics, write_metrics_csv
from cellmask.engine.loaders import Batch, set_loader_epoch
from cellmask.engine.loop import (
    NonFiniteGuard,
    TrainStep,
    WallClockBudget,
    epoch_means,
    fmt,
    train_one_epoch,
)
from cellmask.engine.optim import build_optimizer, build_scheduler
from cellmask.engine.rng import rng_state, seed_everything, set_rng_state

log = logging.getLogger("cellmask.engine")

STOPPED_MAX_HOURS = "max_hours"
"""``stopped`` of a run (and of its cut epoch's row) that the wall-clock budget ended."""

ValFn = Callable[[nn.Module, int, DistInfo], Mapping[str, float]]
"""``val_fn(model, epoch, info) -> {"AP": ..}``, called on every rank (contract 3)."""


@dataclass
class Run:
    """What the steps of :func:`fit` share: the config, where this process stands, the model with
    its optimisation state, and the run's record so far."""

    cfg: dict[str, Any]
    info: DistInfo
    out_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    iters_per_epoch: int
    monitor: str
    mode: str
    guard: NonFiniteGuard
    step: nn.Module | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    start_epoch: int = 0
    start_iteration: int = 0
    init_report: InitReport | None = None
    budget: WallClockBudget | None = None
    stopped: str | None = None

    @property
    def tcfg(self) -> dict[str, Any]:
        return train_config(self.cfg)

    @property
    def total_epochs(self) -> int:
        return int(self.tcfg["epochs"])


def fit(
    model: nn.Module,
    train_loader: DataLoader | Iterable[Batch],
    val_fn: ValFn | None,
    cfg: Mapping[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    init: str | Path | None = None,
    epochs: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``epochs`` (default ``cfg.train.epochs``), checkpointing every epoch.

    Args:
        model: built on CPU or any device; moved to the run's device here.
        train_loader: yields ``(images, targets)``; best made by
            :func:`~cellmask.engine.loaders.build_train_loader`, whose batches depend only on
            (seed, epoch) (``set_epoch`` is called on samplers that have it).
        val_fn: ``val_fn(model, epoch, info) -> {"AP": ..}`` after each ``train.val_every``
            epochs, on EVERY rank, with the bare model in whatever mode it left; it evaluates
            its shard and gathers (:func:`~cellmask.engine.dist.shard`,
            :func:`~cellmask.engine.dist.gather_objects`), so every rank returns the same
            metrics; keys are logged as ``val_<key>``. A two-argument ``val_fn(model, epoch)`` is
            called the same way and must evaluate everything itself. ``None``: no validation,
            ``best.pt`` then follows the lowest training loss.
        cfg: the full resolved config (saved to ``config.yaml`` and in every checkpoint).
        out_dir: the run directory (see the package docstring).
        resume: continue from ``out_dir/last.pt`` (weights, optimiser, scheduler, scaler, epoch,
            history, best, RNG states): the result equals an uninterrupted run's.
        init: a checkpoint whose weights initialise the model
            (:func:`~cellmask.engine.checkpoints.load_init_weights`; class layers re-initialised
            when the class count differs). Ignored when resuming.
        epochs: total epochs of the run, overriding ``cfg.train.epochs`` (schedule included).
        device: ``cpu``, ``cuda``, or ``None`` for CUDA when available (under DDP each process
            uses ``cuda:LOCAL_RANK``).

    ``cfg.train.max_hours`` (hours, from this call's start; null or 0: none) ends training after
    the iteration that passes it; ``resume=True`` continues from the next (module docstring).

    Returns:
        ``{"history": [row per epoch], "best": {"epoch", "metric", "value"} | None,
        "out_dir": Path, "init": InitReport | None, "model": model, "stopped": "max_hours" |
        None}`` (``stopped``: why training ended before the last epoch; ``None``: it did not).

    Raises:
        ValueError: ``train.max_hours`` is negative or not a number.
    """
    budget = WallClockBudget.from_config(to_plain(cfg))  # started now; a bad value fails first
    run = new_run(
        model, cfg, out_dir, train_loader, validates=val_fn is not None, epochs=epochs, device=device
    )
    run.budget = budget
    if resume:
        restore(run, ignored_init=init)
    else:
        seed_everything(int(run.tcfg["seed"]))
        if init is not None:
            run.init_report = load_init_weights(model, init)
        if run.info.is_main:  # a fresh run in a used directory: steps.csv starts over
            (run.out_dir / "steps.csv").unlink(missing_ok=True)
    open_run(run)
    for epoch in range(run.start_epoch, run.total_epochs):
        started = time.perf_counter()
        start = run.start_iteration if epoch == run.start_epoch else 0
        row, steps = train_epoch(run, train_loader, epoch, start)
        cut = row.get("stopped") is not None
        inside = cut and int(row["iters"]) < run.iters_per_epoch  # the cut left batches of this epoch
        states = gather_objects(rng_state(), run.info) if cut else None  # before the cut's validation
        row.update(validate(run, val_fn, epoch, force=cut))
        row["time_s"] = round(time.perf_counter() - started, 3)
        is_best = record_epoch(run, row)
        save_epoch(run, row, steps, is_best, rng=states, iteration=int(row["iters"]) if inside else 0)
        if cut:
            run.stopped = str(row["stopped"])
            if run.info.is_main:
                then = (
                    f"resume=True continues with epoch {epoch + 1}, iteration {int(row['iters']) + 1}"
                    if inside
                    else f"resume=True continues with epoch {epoch + 2}"
                )
                log.warning(
                    "stopped: %s (%.4g h budget spent after %.4g h) in epoch %d/%d after %d/%d "
                    "iterations; last.pt written (%s)",
                    run.stopped, budget.max_hours if budget else 0.0,
                    budget.elapsed() / 3600 if budget else 0.0, epoch + 1, run.total_epochs,
                    row["iters"], run.iters_per_epoch, then,
                )  # fmt: skip
            break
    return {
        "history": run.history,
        "best": run.best,
        "out_dir": run.out_dir,
        "init": run.init_report,
        "model": model,
        "stopped": run.stopped,
    }


def new_run(
    model: nn.Module,
    cfg: Mapping[str, Any],
    out_dir: str | Path,
    train_loader: Iterable[Batch],
    *,
    validates: bool,
    epochs: int | None = None,
    device: str | torch.device | None = None,
) -> Run:
    """A fresh :class:`Run`: the process group joined, ``model`` on its device, optimiser,
    per-iteration schedule and AMP scaler built from ``cfg`` (``epochs`` overriding
    ``train.epochs``)."""
    info = init_distributed(device)
    cfg = to_plain(cfg)
    cfg.setdefault("train", {})
    if epochs is not None:
        cfg["train"]["epochs"] = int(epochs)
    tcfg = train_config(cfg)
    monitor, mode = (str(tcfg["monitor"]), str(tcfg["monitor_mode"])) if validates else ("train_loss", "min")
    if mode not in ("max", "min"):
        raise ValueError(f"train.monitor_mode must be max or min, got {mode!r}")
    iters_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if iters_per_epoch == 0:
        raise ValueError("the training loader is empty (no images, or batch_size too large with drop_last)")
    model.to(info.device)
    optimizer = build_optimizer(cfg, model)
    use_amp = bool(tcfg["amp"]) and info.device.type == "cuda" and str(tcfg["amp_dtype"]) == "float16"
    return Run(
        cfg=cfg,
        info=info,
        out_dir=Path(out_dir),
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, iters_per_epoch, int(tcfg["epochs"])),
        scaler=torch.amp.GradScaler(info.device.type, enabled=use_amp),
        iters_per_epoch=iters_per_epoch,
        monitor=monitor,
        mode=mode,
        guard=NonFiniteGuard(int(tcfg["max_nonfinite"])),
    )


def restore(run: Run, ignored_init: str | Path | None = None) -> None:
    """Continue ``run`` from ``out_dir/last.pt``: weights, optimiser, scheduler, scaler, epoch,
    history, best and this rank's RNG states; ``steps.csv`` loses the rows of epochs after it.

    Raises:
        FileNotFoundError / CheckpointError: no readable ``last.pt``, or one that does not fit.
    """
    path = run.out_dir / "last.pt"
    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and run.scaler.is_enabled():
            run.scaler.load_state_dict(ckpt["scaler"])
        run.start_epoch = int(ckpt["epoch"])
        run.start_iteration = int(ckpt.get("iteration") or 0)
        run.history = [dict(row) for row in ckpt.get("history", []) if int(row["epoch"]) <= run.start_epoch]
        run.best = dict(ckpt["best"]) if ckpt.get("best") else None
        states = ckpt["rng"]
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot resume from it ({exc})") from exc
    set_rng_state(states[run.info.rank] if len(states) == run.info.world_size else states[0])
    if run.info.is_main:
        keep_epochs_csv(
            run.out_dir / "steps.csv",
            run.start_epoch,
            before_iteration=run.start_epoch * run.iters_per_epoch + run.start_iteration,
        )
    if ignored_init is not None:
        log.info("resuming: --init %s ignored (weights come from last.pt)", ignored_init)
    log.info(
        "resumed from %s after epoch %d%s", path, run.start_epoch,
        f" and {run.start_iteration} iterations of the next" if run.start_iteration else "",
    )  # fmt: skip


def open_run(run: Run) -> None:
    """Wrap the model for training (:class:`~cellmask.engine.loop.TrainStep`, in DDP when
    distributed) and, on rank 0, create the run directory and write ``config.yaml``."""
    run.step = TrainStep(run.model)
    if run.info.distributed:
        device = run.info.device
        run.step = nn.parallel.DistributedDataParallel(
            run.step,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(run.tcfg["find_unused_parameters"]),
        )
    if run.info.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, run.out_dir / "config.yaml")


def train_epoch(
    run: Run, loader: Iterable[Batch], epoch: int, start: int = 0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One epoch of training from its iteration ``start`` (a run resumed inside the epoch):
    ``(epoch row, per-step rows of every rank)``.

    The row holds ``epoch`` (1-based), ``train_<key>`` means over every rank's steps,
    ``train_skipped_steps`` and ``lr`` (and ``resumed_at``: ``start``, when not 0). When the
    run's budget ended the session (and not at the run's very end) the row also holds
    ``stopped="max_hours"`` and ``iters`` (the epoch's iterations done, ``start`` included).
    """
    info = run.info
    if not set_loader_epoch(loader, epoch, int(run.tcfg["seed"]), info.rank, skip_batches=start):
        loader = itertools.islice(loader, start, None)  # no EpochSampler: read and drop the batches done
    mine: list[dict[str, Any]] = []
    stats = train_one_epoch(
        run.step or TrainStep(run.model), loader, run.optimizer, run.scheduler, run.scaler,
        device=info.device, cfg=run.cfg, epoch=epoch, guard=run.guard, info=info,
        start_iteration=epoch * run.iters_per_epoch + start, steps=mine, budget=run.budget,
    )  # fmt: skip
    steps = sorted(
        (row for rows in gather_objects(mine, info) for row in rows),
        key=lambda row: (row["iteration"], row["rank"]),
    )
    row: dict[str, Any] = {"epoch": epoch + 1}
    row.update({f"train_{k}": v for k, v in epoch_means(steps).items()})
    row["train_skipped_steps"] = stats["skipped_steps"]  # the same on every rank (decided jointly)
    row["lr"] = stats["lr"]
    if start:
        row["resumed_at"] = start
    done = start + int(stats["iters"])
    finished = epoch + 1 == run.total_epochs and done >= run.iters_per_epoch
    if stats["stopped"] and not finished:  # decided jointly: the same on every rank
        row["stopped"] = STOPPED_MAX_HOURS
        row["iters"] = done
    return row, steps


def validate(
    run: Run,
    val_fn: ValFn | Callable[..., Mapping[str, float]] | None,
    epoch: int,
    force: bool = False,
) -> dict[str, float]:
    """``{"val_<key>": value}`` of ``val_fn`` on every rank, when ``epoch`` is due for validation
    (every ``train.val_every`` epochs, the last, and any when ``force``: a run's cut epoch);
    ``{}`` otherwise or without ``val_fn``."""
    every = max(int(run.tcfg["val_every"]), 1)
    due = force or (epoch + 1) % every == 0 or epoch + 1 == run.total_epochs
    if val_fn is None or not due:
        return {}
    try:
        inspect.signature(val_fn).bind(run.model, epoch, run.info)
    except TypeError:  # a two-argument val_fn(model, epoch)
        metrics = val_fn(run.model, epoch)  # type: ignore[call-arg]
    except ValueError:  # no signature to inspect
        metrics = val_fn(run.model, epoch, run.info)
    else:
        metrics = val_fn(run.model, epoch, run.info)
    return {f"val_{k}": float(v) for k, v in metrics.items()}


def record_epoch(run: Run, row: dict[str, Any]) -> bool:
    """Append ``row`` to the history; True when its monitored value is the best so far."""
    run.history.append(row)
    value = row.get(run.monitor)
    if value is None or not _improved(float(value), run.best["value"] if run.best else None, run.mode):
        return False
    run.best = {"epoch": row["epoch"], "metric": run.monitor, "value": float(value)}
    return True


def save_epoch(
    run: Run,
    row: dict[str, Any],
    steps: list[dict[str, Any]],
    is_best: bool,
    rng: list[Any] | None = None,
    iteration: int = 0,
) -> None:
    """Write the epoch (rank 0; every rank hands over its RNG states): ``steps.csv`` rows,
    ``last.pt``, ``epoch_XXX.pt`` when due or the run stops there (older ones pruned),
    ``best.pt`` when ``is_best``,
    ``metrics.csv`` and ``metrics.png``; then wait for every rank.

    Args:
        rng: every rank's RNG states to save (default: taken now).
        iteration: > 0 when the epoch was cut before its end: ``last.pt`` then records
            ``epoch - 1`` epochs complete and ``iteration`` iterations of this one done.
    """
    info, out_dir, tcfg = run.info, run.out_dir, run.tcfg
    states = rng if rng is not None else gather_objects(rng_state(), info)
    epoch = int(row["epoch"])
    if info.is_main:
        append_rows_csv(steps, out_dir / "steps.csv")  # before last.pt: a resume drops rows past it
        payload = {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "epoch": epoch - 1 if iteration else epoch,
            "iteration": int(iteration),
            "config": run.cfg,
            "history": run.history,
            "best": run.best,
            "rng": states,
            "meta": {"torch": str(torch.__version__), "world_size": info.world_size},
        }
        save_checkpoint(payload, out_dir / "last.pt")
        weights = {
            "model": payload["model"],
            "epoch": epoch,
            "config": run.cfg,
            "metrics": row,
            "best": run.best,
        }
        every = max(int(tcfg["checkpoint_every"] or 0), 0)
        if (every and epoch % every == 0) or epoch == run.total_epochs or row.get("stopped"):
            save_checkpoint(weights, out_dir / f"epoch_{epoch:03d}.pt")
            prune_epoch_checkpoints(out_dir, tcfg.get("keep_epoch_checkpoints"))
        if is_best:
            save_checkpoint(weights, out_dir / "best.pt")
        write_metrics_csv(run.history, out_dir / "metrics.csv")
        plot_metrics(run.history, out_dir / "metrics.png")
        numbers = {k: v for k, v in row.items() if k != "epoch" and not isinstance(v, str)}
        note = f" (stopped: {row['stopped']})" if row.get("stopped") else ""
        log.info("epoch %d/%d: %s%s", epoch, run.total_epochs, fmt(numbers), note)
    barrier(info)


def _improved(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best
