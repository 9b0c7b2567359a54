"""The steps of one epoch of :func:`cellmask.engine.runner.fit`: train it (from an iteration
inside it, for a resumed run), validate it when due, record it, save it."""

from __future__ import annotations

import inspect
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from cellmask.engine.checkpoints import (
    prune_epoch_checkpoints,
    save_checkpoint,
)
from cellmask.engine.dist import barrier, gather_objects
from cellmask.engine.history import append_rows_csv, plot_metrics, write_metrics_csv
from cellmask.engine.loaders import Batch, set_loader_epoch
from cellmask.engine.loop import (
    TrainStep,
    epoch_means,
    fmt,
    train_one_epoch,
)
from cellmask.engine.rng import rng_state
from cellmask.engine.run import STOPPED_MAX_HOURS, Run, ValFn
from cellmask.engine.status import run_status, write_status

log = logging.getLogger("cellmask.engine")


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
        write_status(out_dir, run_status(run.history, run.total_epochs, run.best, run.iters_per_epoch))
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
