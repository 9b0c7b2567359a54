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

import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from cellmask.config import save_config, to_plain
from cellmask.engine.amp import amp_dtype, needs_scaler, tune_backends
from cellmask.engine.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_init_weights,
)
from cellmask.engine.defaults import train_config
from cellmask.engine.dist import gather_objects, init_distributed
from cellmask.engine.epochs import record_epoch, save_epoch, train_epoch, validate
from cellmask.engine.history import keep_epochs_csv
from cellmask.engine.loaders import Batch
from cellmask.engine.loop import (
    NonFiniteGuard,
    TrainStep,
    WallClockBudget,
)
from cellmask.engine.optim import build_optimizer, build_scheduler
from cellmask.engine.rng import rng_state, seed_everything, set_rng_state
from cellmask.engine.run import Run, ValFn
from cellmask.engine.status import ResumeError, resume_problems, run_status

log = logging.getLogger("cellmask.engine")


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
    extend: bool = False,
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
            history, best, RNG states): the result equals an uninterrupted run's. The config must
            be the one in ``last.pt`` but for :data:`~cellmask.engine.status.RESUME_MAY_CHANGE`,
            and ``epochs`` above the epochs done (:func:`~cellmask.engine.status.resume_problems`).
        extend: with ``resume``, allow a longer schedule than the run's (``epochs`` above its
            ``train.epochs``): the learning-rate schedule is recomputed over the new length
            (the change of the learning rate at the resume point is logged).
        init: a checkpoint whose weights initialise the model
            (:func:`~cellmask.engine.checkpoints.load_init_weights`; class layers re-initialised
            when the class count differs). Ignored when resuming.
        epochs: total epochs of the run, overriding ``cfg.train.epochs`` (schedule included).
        device: ``cpu``, ``cuda``, or ``None`` for CUDA when available (under DDP each process
            uses ``cuda:LOCAL_RANK``).

    ``cfg.train.max_hours`` (hours, from this call's start; null or 0: none) and
    ``cfg.train.deadline`` (a ``time.time()`` instant) end training after the iteration that
    passes the earlier of them less the reserve for the last validation and save
    (:class:`~cellmask.engine.loop.WallClockBudget`); ``resume=True`` continues from the next.

    Returns:
        ``{"history": [row per epoch], "best": {"epoch", "metric", "value"} | None,
        "out_dir": Path, "init": InitReport | None, "model": model, "stopped": "max_hours" |
        None, "status": RunStatus}`` (``stopped``: why training ended before the last epoch;
        ``None``: it did not; ``status``: also in ``status.json``).

    Raises:
        ValueError: ``train.max_hours`` is negative or not a number.
        ResumeError: ``resume`` with a config or ``epochs`` that would not continue the same run.
    """
    budget = WallClockBudget.from_config(to_plain(cfg))  # started now; a bad value fails first
    run = new_run(
        model, cfg, out_dir, train_loader, validates=val_fn is not None, epochs=epochs, device=device
    )
    run.budget = budget
    if resume:
        restore(run, ignored_init=init, extend=extend)
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
        closing = time.perf_counter()
        row.update(validate(run, val_fn, epoch, force=cut))
        row["time_s"] = round(time.perf_counter() - started, 3)
        is_best = record_epoch(run, row)
        save_epoch(run, row, steps, is_best, rng=states, iteration=int(row["iters"]) if inside else 0)
        if budget is not None and any(k.startswith("val_") for k in row):  # the cut's own must fit too
            budget.reserve(time.perf_counter() - closing)
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
        "status": run_status(run.history, run.total_epochs, run.best, run.iters_per_epoch),
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
    dtype = amp_dtype(tcfg["amp_dtype"], info.device)
    use_amp = needs_scaler(bool(tcfg["amp"]), dtype, info.device)
    tune_backends(info.device, fixed_size=True)  # 520x704 images resized to one size; 128x128 crops
    if bool(tcfg["amp"]) and info.device.type == "cuda":
        log.info("autocast %s%s", str(dtype).replace("torch.", ""), " with GradScaler" if use_amp else "")
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


def restore(run: Run, ignored_init: str | Path | None = None, extend: bool = False) -> None:
    """Continue ``run`` from ``out_dir/last.pt``: weights, optimiser, scheduler, scaler, epoch,
    history, best and this rank's RNG states; ``steps.csv`` loses the rows of epochs after it.

    Raises:
        FileNotFoundError / CheckpointError: no readable ``last.pt``, or one that does not fit.
        ResumeError: ``run``'s config differs from the one in ``last.pt`` (but for
            :data:`~cellmask.engine.status.RESUME_MAY_CHANGE`), or its epochs would train
            nothing, or lengthen the schedule without ``extend``.
    """
    path = run.out_dir / "last.pt"
    ckpt = load_checkpoint(path, map_location="cpu")
    if isinstance(ckpt.get("config"), Mapping):
        problems = resume_problems(ckpt["config"], run.cfg, int(ckpt.get("epoch") or 0), extend=extend)
        if problems:
            raise ResumeError(
                f"{path}: this continuation would not continue that run: " + "; ".join(problems)
                + ". Continue it with the config it was started with (the session's max_hours may change)"
            )  # fmt: skip
    old_lr = [float(x) for x in (ckpt.get("scheduler") or {}).get("_last_lr", [])]
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
    planned = int(train_config(ckpt.get("config") or {})["epochs"]) if ckpt.get("config") else None
    if planned is not None and planned != run.total_epochs and run.info.is_main:
        step = run.scheduler.last_epoch
        new_lr = [
            base * fn(step) for base, fn in zip(run.scheduler.base_lrs, run.scheduler.lr_lambdas, strict=True)
        ]
        log.warning(
            "extended: the schedule grows from %d to %d epochs; the learning rate at the resume point "
            "goes from %s to %s (the %s schedule is recomputed over %d epochs)",
            planned, run.total_epochs, _lrs(old_lr), _lrs(new_lr), run.tcfg["scheduler"], run.total_epochs,
        )  # fmt: skip
    log.info(
        "resumed from %s after epoch %d%s", path, run.start_epoch,
        f" and {run.start_iteration} iterations of the next" if run.start_iteration else "",
    )  # fmt: skip


def _lrs(values: list[float]) -> str:
    return "/".join(f"{v:.3g}" for v in values) or "?"


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
