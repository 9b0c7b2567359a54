"""One training epoch: forward, backward, clip, step, schedule, with the non-finite guard, the
``on_optimizer_step`` hook, a per-step log and the wall-clock budget (``train.max_hours``).

A training step returns a dict (contract 1): keys starting with ``loss`` are summed into the
total loss (which is backpropagated); any other key is a statistic (a float or a 0-d tensor)
that is logged, per step and as an epoch mean, but never added to the loss.
"""

from __future__ import annotations

import logging
import math
import numbers
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cellmask.engine.amp import amp_dtype
from cellmask.engine.defaults import train_config
from cellmask.engine.dist import DistInfo
from cellmask.engine.loaders import Batch, move_to_device

log = logging.getLogger("cellmask.engine")

STEP_COLUMNS = ("epoch", "iteration", "rank", "skipped", "lr")
"""The bookkeeping columns of a per-step row (the values of the step follow them)."""


class TrainStep(nn.Module):
    """The training-step protocol as a module, so DDP can wrap it.

    ``forward(batch)`` calls ``model.training_step(batch)`` if the model has one, else
    ``model(images, targets)``; either returns the losses dict (module docstring). Wrapping this
    (not the model) in DDP makes a custom ``training_step`` run inside DDP's forward, so
    gradients sync.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> dict[str, Any]:
        if callable(getattr(self.model, "training_step", None)):
            return self.model.training_step(batch)
        images, targets = batch
        return self.model(images, targets)


def bare_model(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper and/or a :class:`TrainStep` (``module`` itself otherwise)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    return module.model if isinstance(module, TrainStep) else module


class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss; raises after ``max_consecutive`` in a row."""

    def __init__(self, max_consecutive: int = 10) -> None:
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def ok(self) -> None:
        self.consecutive = 0

    def skip(self, where: str, losses: Mapping[str, float]) -> None:
        self.skipped += 1
        self.consecutive += 1
        log.warning("non-finite loss at %s (%s): step skipped", where, fmt(losses))
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive} consecutive non-finite losses (last at {where}: {fmt(losses)}); "
                "lower the learning rate, check the data, or disable AMP"
            )


class WallClockBudget:
    """When training must stop: ``train.max_hours`` counted from construction (the start of a
    ``fit``) and/or ``train.deadline`` (a ``time.time()`` instant, e.g. a Kaggle session's end),
    whichever comes first, less a reserve kept for the last validation and save.

    The reserve starts at ``train.reserve_minutes`` and grows to the slowest validation + save the
    run measures (:meth:`reserve`), so the cut epoch's forced validation and its checkpoints fit in
    the budget. :meth:`passed` is a collective under DDP: every rank calls it after the same step
    and gets the same answer (true once any rank's clock is past the budget), so all ranks stop
    together.

    Raises:
        ValueError: ``max_hours`` is not a non-negative number, or neither a budget nor a
            deadline is given (``None`` or 0 mean no budget in a config: :meth:`from_config`
            returns ``None`` for them).
    """

    def __init__(
        self,
        max_hours: float | None = None,
        start: float | None = None,
        deadline: float | None = None,
        reserve_s: float = 0.0,
    ) -> None:
        self.max_hours = _check_max_hours(max_hours)
        if self.max_hours == 0 and deadline is None:
            raise ValueError(
                "a WallClockBudget needs max_hours > 0 or a deadline (none: no budget, no object)"
            )
        self.seconds = self.max_hours * 3600.0 if self.max_hours else math.inf
        self.start = time.monotonic() if start is None else float(start)
        self.deadline = None if deadline is None else float(deadline)
        self.reserve_s = max(float(reserve_s), 0.0)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> WallClockBudget | None:
        """The budget of ``cfg``'s ``train.max_hours`` / ``train.deadline`` /
        ``train.reserve_minutes``; ``None`` when there is neither a budget nor a deadline."""
        tcfg = train_config(cfg)
        hours = _check_max_hours(tcfg.get("max_hours"))
        deadline = tcfg.get("deadline")
        if not hours and deadline is None:
            return None
        reserve = float(tcfg.get("reserve_minutes") or 0.0) * 60.0
        return cls(hours or None, deadline=None if deadline is None else float(deadline), reserve_s=reserve)

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.start

    def remaining(self) -> float:
        """Seconds left before the budget's end (the reserve not deducted; may be negative)."""
        left = self.seconds - self.elapsed()
        if self.deadline is not None:
            left = min(left, self.deadline - time.time())
        return left

    def reserve(self, seconds: float) -> None:
        """Keep at least ``seconds`` before the end (a validation + save just measured)."""
        self.reserve_s = max(self.reserve_s, float(seconds))

    def passed(self, info: DistInfo | None = None) -> bool:
        """Whether the budget, less the reserve, is spent (on any rank: call it on every rank
        under DDP)."""
        over = self.remaining() <= self.reserve_s
        if info is not None and info.distributed:
            flag = torch.tensor([1.0 if over else 0.0], device=info.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            over = bool(flag.item() > 0)
        return over


def _check_max_hours(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"train.max_hours must be a number of hours (null or 0: no budget), got {value!r}")
    if value < 0:
        raise ValueError(f"train.max_hours must be >= 0 hours (null or 0: no budget), got {value!r}")
    return float(value)


def fmt(values: Mapping[str, float]) -> str:
    """``k=v, ...`` with 4 significant digits (log lines)."""
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


def epoch_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of each value over the per-step ``rows`` of steps not skipped, any rank (a statistic's
    non-finite values are left out of its mean); ``{"loss": nan}`` when every step was skipped."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        if row["skipped"]:
            continue
        for key, value in row.items():
            if key in STEP_COLUMNS or not math.isfinite(value):
                continue
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {k: sums[k] / counts[k] for k in sums} or {"loss": float("nan")}


def total_loss(losses: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """``(total loss, values)``: the float32 sum of the ``loss*`` entries (for backward), and every
    entry of the dict as a float plus the total as ``"loss"`` (read with one device sync).

    Raises:
        ValueError: no key starts with ``loss``.
    """
    keys = [k for k in losses if k.startswith("loss")]
    if not keys:
        raise ValueError(
            f"the training step returned no loss (no key starts with 'loss'; got {list(losses)})"
        )
    stats = [k for k in losses if k not in keys]
    parts = torch.stack([torch.as_tensor(losses[k], device=device).float().reshape(()) for k in keys])
    loss = parts.sum()
    logged = [parts.detach(), loss.detach()[None]]
    logged += [torch.as_tensor(losses[k], device=device).detach().float().reshape(1) for k in stats]
    numbers = torch.cat(logged).tolist()
    return loss, dict(zip([*keys, "loss", *stats], numbers, strict=True))


def _show_progress(tcfg: Mapping[str, Any], info: DistInfo) -> bool:
    if not info.is_main:
        return False
    if tcfg.get("progress") is None or tcfg.get("progress") == "auto":
        return sys.stderr.isatty() or "ipykernel" in sys.modules  # a terminal or a notebook
    return bool(tcfg["progress"])


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    *,
    device: torch.device | str = "cpu",
    cfg: Mapping[str, Any] | None = None,
    epoch: int = 0,
    guard: NonFiniteGuard | None = None,
    info: DistInfo | None = None,
    start_iteration: int = 0,
    steps: list[dict[str, Any]] | None = None,
    budget: WallClockBudget | None = None,
) -> dict[str, float]:
    """One pass over ``loader``: forward, backward, clip, step, hook, schedule (per iteration).

    Args:
        model: the model, a :class:`TrainStep`, or a DDP-wrapped :class:`TrainStep`.
        loader: yields ``(images, targets)`` batches (moved to ``device`` here).
        scheduler: stepped after every iteration (skipped ones included, so the schedule follows
            the iteration count).
        scaler: AMP gradient scaler (``None``: a disabled one). Autocast is on only when
            ``train.amp`` is true and ``device`` is CUDA.
        cfg: full config or train section (``grad_clip``, ``amp``, ``amp_dtype``,
            ``max_nonfinite``, ``progress``, ``epochs`` for the progress label).
        guard: counts skipped steps across epochs; a step whose total loss is not finite (on any
            rank) is skipped: no backward, no optimiser step.
        start_iteration: the run's 0-based index of this epoch's first iteration.
        steps: if given, one row per iteration is appended: ``epoch`` (1-based), ``iteration``
            (the run's, 0-based), ``rank``, ``skipped`` (0/1), ``lr``, then every value of the
            step's dict and the total ``loss``.
        budget: checked after every iteration (on every rank, jointly); once it has passed, the
            epoch ends there (``stopped`` is 1 in the result).

    After every optimizer step actually taken (not skipped by the guard, nor by the AMP scaler
    after an overflow) the bare model's ``on_optimizer_step(iteration)`` is called if it has one
    (contract 2; ``iteration`` as in ``steps``).

    Returns:
        the mean of every value (:func:`epoch_means`, this rank's steps), plus
        ``skipped_steps``, ``iters``, the ``lr`` the last step used and ``stopped`` (1.0 when
        ``budget`` ended the epoch, else 0.0).
    """
    from tqdm.auto import tqdm

    tcfg = train_config(cfg or {})
    device = torch.device(device)
    info = info or DistInfo(device=device)
    guard = guard or NonFiniteGuard(int(tcfg["max_nonfinite"]))
    use_amp = bool(tcfg["amp"]) and device.type == "cuda"
    dtype = amp_dtype(tcfg["amp_dtype"], device)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    step = model if isinstance(model, TrainStep | nn.parallel.DistributedDataParallel) else TrainStep(model)
    hook = getattr(bare_model(step), "on_optimizer_step", None)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    clip = float(tcfg["grad_clip"] or 0.0)

    step.train()
    rows: list[dict[str, Any]] = []
    skipped_before, iters, last_lr, loss_sum, taken_steps = guard.skipped, 0, 0.0, 0.0, 0
    stopped = False
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{tcfg['epochs']}",
        disable=not _show_progress(tcfg, info),
        dynamic_ncols=True,
        leave=False,
    )
    for batch in bar:
        iteration = start_iteration + iters
        iters += 1
        batch = move_to_device(batch, device)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
            losses = step(batch)
        if not losses:
            raise ValueError("the training step returned no losses")
        loss, values = total_loss(losses, device)
        finite = math.isfinite(values["loss"])
        if info.distributed:  # every rank must take the same branch, or DDP's all-reduce hangs
            flag = torch.tensor([1.0 if finite else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item() > 0)

        optimizer.zero_grad(set_to_none=True)
        last_lr = float(optimizer.param_groups[0]["lr"])
        if finite:
            scaler.scale(loss).backward()
            if clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip)
            scale = scaler.get_scale() if scaler.is_enabled() else 0.0
            scaler.step(optimizer)
            scaler.update()
            guard.ok()
            taken = not scaler.is_enabled() or scaler.get_scale() >= scale  # a lowered scale: overflow
            if taken and callable(hook):
                hook(iteration)
        else:
            elsewhere = "" if not math.isfinite(values["loss"]) else " on another rank"
            guard.skip(f"epoch {epoch + 1}, iteration {iters}{elsewhere}", values)
        rows.append(
            {"epoch": epoch + 1, "iteration": iteration, "rank": info.rank, "skipped": int(not finite)}
            | {"lr": last_lr, **values}
        )
        if scheduler is not None:
            with warnings.catch_warnings():  # a skipped first step is not a misordered call
                warnings.filterwarnings(
                    "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
                )
                scheduler.step()
        if finite:
            loss_sum, taken_steps = loss_sum + values["loss"], taken_steps + 1
            bar.set_postfix(loss=f"{loss_sum / taken_steps:.4f}", refresh=False)
        if budget is not None and budget.passed(info):
            stopped = True
            break
    bar.close()

    if steps is not None:
        steps.extend(rows)
    stats = epoch_means(rows)
    stats["skipped_steps"] = float(guard.skipped - skipped_before)
    stats["iters"] = float(iters)
    stats["lr"] = last_lr if iters else float(optimizer.param_groups[0]["lr"])
    stats["stopped"] = 1.0 if stopped else 0.0
    return stats
