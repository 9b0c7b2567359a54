"""The training engine every model shares: optimiser, schedule, epochs, checkpoints, AMP, DDP.

One loop for the detectors, the segmenter and Soft Teacher. A model plugs in by its calling
convention only:

* if it defines ``training_step(batch) -> dict[str, Tensor]`` that is called (Soft Teacher);
* else ``model(images, targets)`` must return a dict of scalar losses (torchvision detectors).

The total loss is the sum of the dict's values. A batch is ``(images, targets)`` as
:func:`cellmask.data.datasets.collate` makes it; :func:`move_to_device` moves every tensor in it.

Run directory written by :func:`fit` (rank 0 only)::

    out_dir/config.yaml     the resolved config
    out_dir/last.pt         everything needed to resume (weights, optimiser, scheduler, scaler,
                            epoch, config, history, best, RNG states of every rank)
    out_dir/epoch_XXX.pt    weights + epoch + config + that epoch's metrics, every
                            ``train.checkpoint_every`` epochs and the last; only the newest
                            ``train.keep_epoch_checkpoints`` are kept (null: all). No optimiser
                            state (as the authors' ``save_optimizer=False``): a full ResNeXt-101
                            checkpoint is ~1 GB, x36 epochs would not fit Kaggle's disk.
    out_dir/best.pt         the same for the best epoch by ``train.monitor``
    out_dir/metrics.csv     one row per epoch; out_dir/metrics.png plots it

Checkpoints hold only tensors and plain containers, and every load uses
``torch.load(..., weights_only=True)``.

Determinism: :func:`fit` seeds every RNG at the start of a fresh run, the train loader's sampler
is re-seeded per epoch (``seed + epoch``) and so are its workers, and ``last.pt`` carries the
torch/CUDA/numpy/python RNG states, so ``resume=True`` continues a run bit for bit (on the same
device and software).

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) :func:`init_distributed` joins the process
group from the environment (NCCL on CUDA, Gloo on CPU), :func:`build_train_loader` shards with a
:class:`~torch.utils.data.DistributedSampler`, :func:`fit` wraps the step in
:class:`~torch.nn.parallel.DistributedDataParallel` (the model's ``training_step`` runs inside
DDP's forward, so gradients sync), validates and writes files on rank 0 only.
``train.batch_size`` is per process.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cellmask.config import save_config, to_plain
from cellmask.errors import DataError

log = logging.getLogger("cellmask.engine")

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 36,
    "batch_size": 2,
    "optimizer": "adamw",
    "lr": 1.0e-4,
    "weight_decay": 1.0e-2,
    "betas": [0.9, 0.999],
    "momentum": 0.9,
    "no_decay_norm_bias": True,
    "scheduler": "cosine",
    "warmup_iters": 500,
    "warmup_ratio": 0.1,
    "min_lr_ratio": 1.0e-5,
    "milestones": [8, 11],
    "gamma": 0.1,
    "grad_clip": 10.0,
    "amp": True,
    "amp_dtype": "float16",
    "num_workers": 2,
    "seed": 0,
    "checkpoint_every": 1,
    "keep_epoch_checkpoints": None,
    "val_every": 1,
    "monitor": "val_AP",
    "monitor_mode": "max",
    "max_nonfinite": 10,
    "progress": None,
    "find_unused_parameters": False,
}
"""What :func:`train_config` fills in for keys a config's ``train`` section lacks."""

NO_DECAY_KEYS = ("absolute_pos_embed", "relative_position_bias_table", "pos_embed", "norm")
"""Parameter-name fragments never weight-decayed (as in Swin's recipe), besides every 1-d parameter."""

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]
ValFn = Callable[[nn.Module, int], Mapping[str, float]]


class CheckpointError(DataError):
    """A checkpoint file exists but cannot be read, or lacks what the caller needs."""


# --------------------------------------------------------------------------------------------
# config, seeding, RNG state


def train_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``train`` section of a full config (or ``cfg`` itself if it is one) over :data:`TRAIN_DEFAULTS`."""
    section = cfg.get("train", cfg) if isinstance(cfg.get("train"), Mapping) else cfg
    return {**TRAIN_DEFAULTS, **dict(section)}


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global RNG is what third-party code draws from)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    npy = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))


# --------------------------------------------------------------------------------------------
# devices and distributed


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA if available else CPU; ``"cuda"`` without a GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    return device


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group if launched by ``torchrun`` (``WORLD_SIZE > 1``); idempotent.

    Backend NCCL when this process uses CUDA, else Gloo; rendezvous from the environment
    (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). On CUDA each
    process takes ``cuda:LOCAL_RANK``. Without ``WORLD_SIZE > 1`` it only resolves the device.
    """
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(device))
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if not initialized:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank=rank, world_size=dist.get_world_size(), local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


# --------------------------------------------------------------------------------------------
# optimiser and schedule


def build_optimizer(cfg: Mapping[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters, from ``cfg["train"]`` (or a train section).

    Keys: ``optimizer`` (``adamw`` | ``sgd``), ``lr``, ``weight_decay``, ``betas`` (AdamW),
    ``momentum`` (SGD), ``no_decay_norm_bias`` (default true: 1-d parameters, i.e. norms and
    biases, and Swin's position tables get no weight decay).
    """
    tcfg = train_config(cfg)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = tcfg["no_decay_norm_bias"] and (param.ndim <= 1 or any(k in name for k in NO_DECAY_KEYS))
        (no_decay if exempt else decay).append(param)
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": float(tcfg["weight_decay"])},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    name, lr = str(tcfg["optimizer"]).lower(), float(tcfg["lr"])
    if name == "adamw":
        betas = tuple(float(b) for b in tcfg["betas"])
        return torch.optim.AdamW(groups, lr=lr, betas=betas)  # type: ignore[arg-type]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(tcfg["momentum"]))
    raise ValueError(f"unknown optimizer {tcfg['optimizer']!r}; expected adamw or sgd")


def lr_factor(
    it: int,
    *,
    kind: str,
    total_iters: int,
    iters_per_epoch: int,
    warmup_iters: int = 0,
    warmup_ratio: float = 0.1,
    min_lr_ratio: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """The learning-rate multiplier at iteration ``it`` (0-based), mmdet-style.

    ``cosine``: ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * it / total_iters)) / 2``,
    reaching ``min_lr_ratio`` at ``total_iters``. ``step``: ``gamma ** k`` with ``k`` the number
    of epoch ``milestones`` passed (``[8, 11]``: x0.1 from the 9th epoch, x0.01 from the 12th).
    ``constant``: 1. Linear warmup multiplies any of them: from ``warmup_ratio`` at iteration 0 to
    1 at ``warmup_iters``.
    """
    if kind == "cosine":
        progress = min(it, total_iters) / max(total_iters, 1)
        base = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "step":
        epoch = it // max(iters_per_epoch, 1)
        base = gamma ** sum(epoch >= m for m in milestones)
    elif kind == "constant":
        base = 1.0
    else:
        raise ValueError(f"unknown scheduler {kind!r}; expected cosine, step or constant")
    if warmup_iters > 0 and it < warmup_iters:
        base *= warmup_ratio + (1.0 - warmup_ratio) * it / warmup_iters
    return base


def build_scheduler(
    cfg: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    iters_per_epoch: int,
    epochs: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration :class:`~torch.optim.lr_scheduler.LambdaLR` following :func:`lr_factor`.

    Keys of ``cfg["train"]``: ``scheduler`` (``cosine`` | ``step`` | ``constant``), ``epochs``
    (overridden by ``epochs``), ``warmup_iters``, ``warmup_ratio``, ``min_lr_ratio`` (cosine),
    ``milestones`` (epochs) and ``gamma`` (step). Call ``step()`` once per iteration.
    """
    tcfg = train_config(cfg)
    epochs = int(epochs if epochs is not None else tcfg["epochs"])
    kwargs = {
        "kind": str(tcfg["scheduler"]).lower(),
        "total_iters": epochs * iters_per_epoch,
        "iters_per_epoch": iters_per_epoch,
        "warmup_iters": int(tcfg["warmup_iters"] or 0),
        "warmup_ratio": float(tcfg["warmup_ratio"]),
        "min_lr_ratio": float(tcfg["min_lr_ratio"]),
        "milestones": [int(m) for m in tcfg["milestones"] or []],
        "gamma": float(tcfg["gamma"]),
    }
    lr_factor(0, **kwargs)  # validates the kind now rather than at the first step

    def factor(it: int) -> float:
        return lr_factor(it, **kwargs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------
# data loading


def collate_pairs(batch: Sequence[tuple[Any, Any]]) -> Batch:
    """``[(image, target), ...]`` -> ``(images, targets)`` lists (same as the datasets' ``collate``)."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and python ``random`` in a loader worker from the torch seed torch gave it."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)


def build_train_loader(
    dataset: Dataset,
    cfg: Mapping[str, Any],
    collate_fn: Callable | None = None,
    info: DistInfo | None = None,
) -> DataLoader:
    """A shuffling loader whose order depends only on ``(train.seed, epoch)``.

    The sampler is a :class:`~torch.utils.data.DistributedSampler` (one replica unless
    distributed): :func:`fit` calls its ``set_epoch`` and re-seeds the loader's generator (thus
    the workers' seeds) each epoch. Batch size ``train.batch_size`` per process, workers
    ``train.num_workers``.
    """
    tcfg = train_config(cfg)
    info = info or init_distributed()
    sampler = DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=int(tcfg["seed"])
    )
    generator = torch.Generator()
    generator.manual_seed(int(tcfg["seed"]))
    return DataLoader(
        dataset,
        batch_size=int(tcfg["batch_size"]),
        sampler=sampler,
        num_workers=int(tcfg["num_workers"]),
        collate_fn=collate_fn or collate_pairs,
        pin_memory=info.device.type == "cuda",
        worker_init_fn=_seed_worker,
        generator=generator,
    )


def build_eval_loader(
    dataset: Dataset, cfg: Mapping[str, Any], collate_fn: Callable | None = None
) -> DataLoader:
    """A loader in dataset order (batch ``train.batch_size``, ``train.num_workers`` workers)."""
    tcfg = train_config(cfg)
    return DataLoader(
        dataset,
        batch_size=int(tcfg["batch_size"]),
        shuffle=False,
        num_workers=int(tcfg["num_workers"]),
        collate_fn=collate_fn or collate_pairs,
    )


def set_loader_epoch(loader: Iterable, epoch: int, seed: int, rank: int = 0) -> None:
    """Make ``loader``'s order and worker seeds a function of ``(seed, epoch, rank)`` only."""
    for obj in (
        getattr(loader, "sampler", None),
        getattr(loader, "batch_sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor inside nested lists/tuples/dicts moved to ``device`` (others kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# one epoch


class TrainStep(nn.Module):
    """The training-step protocol as a module, so DDP can wrap it.

    ``forward(batch)`` calls ``model.training_step(batch)`` if the model has one, else
    ``model(images, targets)``; either returns a dict of scalar losses. Wrapping this (not the
    model) in DDP makes a custom ``training_step`` run inside DDP's forward, so gradients sync.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        if callable(getattr(self.model, "training_step", None)):
            return self.model.training_step(batch)
        images, targets = batch
        return self.model(images, targets)


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
        log.warning("non-finite loss at %s (%s): step skipped", where, _fmt(losses))
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive} consecutive non-finite losses (last at {where}: {_fmt(losses)}); "
                "lower the learning rate, check the data, or disable AMP"
            )


def _fmt(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


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
) -> dict[str, float]:
    """One pass over ``loader``: forward, backward, clip, step, schedule (per iteration).

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

    Returns:
        mean of every loss and of the total ``loss`` over the finite steps, plus
        ``skipped_steps``, ``iters`` and the ``lr`` the last step used (rank-local values).
    """
    from tqdm.auto import tqdm

    tcfg = train_config(cfg or {})
    device = torch.device(device)
    info = info or DistInfo(device=device)
    guard = guard or NonFiniteGuard(int(tcfg["max_nonfinite"]))
    use_amp = bool(tcfg["amp"]) and device.type == "cuda"
    amp_dtype = getattr(torch, str(tcfg["amp_dtype"]))
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    step = model if isinstance(model, TrainStep | nn.parallel.DistributedDataParallel) else TrainStep(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    clip = float(tcfg["grad_clip"] or 0.0)

    step.train()
    sums: dict[str, float] = {}
    finite_steps, skipped_before, iters, last_lr = 0, guard.skipped, 0, 0.0
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{tcfg['epochs']}",
        disable=not _show_progress(tcfg, info),
        dynamic_ncols=True,
        leave=False,
    )
    for batch in bar:
        iters += 1
        batch = move_to_device(batch, device)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            losses = step(batch)
        if not losses:
            raise ValueError("the training step returned no losses")
        parts = torch.stack([v.float().reshape(()) for v in losses.values()])
        loss = parts.sum()
        numbers = torch.cat([parts.detach(), loss.detach()[None]]).tolist()  # one device sync
        values = dict(zip([*losses, "loss"], numbers, strict=True))
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
            scaler.step(optimizer)
            scaler.update()
            guard.ok()
            finite_steps += 1
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
        else:
            elsewhere = "" if not math.isfinite(values["loss"]) else " on another rank"
            guard.skip(f"epoch {epoch + 1}, iteration {iters}{elsewhere}", values)
        if scheduler is not None:
            with warnings.catch_warnings():  # a skipped first step is not a misordered call
                warnings.filterwarnings(
                    "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
                )
                scheduler.step()
        if finite_steps:
            bar.set_postfix(loss=f"{sums['loss'] / finite_steps:.4f}", refresh=False)
    bar.close()

    stats = {k: v / finite_steps for k, v in sums.items()} if finite_steps else {"loss": float("nan")}
    stats["skipped_steps"] = float(guard.skipped - skipped_before)
    stats["iters"] = float(iters)
    stats["lr"] = last_lr if iters else float(optimizer.param_groups[0]["lr"])
    return stats


# --------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(payload: Mapping[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, map_location, weights_only=True)`` with clear errors.

    Raises:
        FileNotFoundError: no such file (the message names it).
        CheckpointError: the file is not a readable checkpoint (corrupt, truncated, or holding
            objects other than tensors and plain containers).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {reason[:300]})"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def checkpoint_state_dict(
    ckpt: Mapping[str, Any], path: str | Path = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint: ``ckpt["model"]``, ``ckpt["state_dict"]``, or ``ckpt``
    itself if it maps names to tensors; a DDP ``module.`` prefix is stripped."""
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), Mapping):
            state = dict(ckpt[key])
            break
    else:
        state = dict(ckpt)
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no model state_dict (keys: {', '.join(list(ckpt)[:8])})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


@dataclass
class InitReport:
    """What :func:`load_init_weights` did, key by key."""

    loaded: list[str]
    reinitialized: list[str]
    missing: list[str]
    unexpected: list[str]

    def summary(self) -> str:
        text = f"{len(self.loaded)} tensors loaded, {len(self.reinitialized)} re-initialised"
        if self.reinitialized:
            text += f" ({', '.join(self.reinitialized)})"
        if self.missing:
            text += f", {len(self.missing)} not in the checkpoint ({', '.join(self.missing[:10])})"
        if self.unexpected:
            text += f", {len(self.unexpected)} unused ({', '.join(self.unexpected[:10])})"
        return text


def load_init_weights(model: nn.Module, source: str | Path | Mapping[str, Any]) -> InitReport:
    """Initialise ``model`` from a checkpoint trained with a possibly different class set.

    Every tensor whose name and shape match is copied. The rest keep ``model``'s own (fresh)
    initialisation: tensors whose shape differs, and, when any tensor under one of
    ``model.class_dependent_prefixes()`` differs, every tensor under those prefixes (so a class
    layer is re-initialised as a whole, weight and bias alike).

    Args:
        model: a freshly built model (its class layers' current values are the re-initialisation).
        source: a checkpoint path (``{"model": state_dict, ...}``, ``{"state_dict": ...}`` or a
            bare state_dict) or such a mapping already loaded.

    Returns:
        the :class:`InitReport` (also logged).
    """
    where = str(source) if isinstance(source, str | Path) else "checkpoint"
    ckpt = load_checkpoint(source) if isinstance(source, str | Path) else dict(source)
    src = checkpoint_state_dict(ckpt, where)
    dst = model.state_dict()
    prefixes = list(model.class_dependent_prefixes()) if hasattr(model, "class_dependent_prefixes") else []
    mismatched = {k for k in dst if k in src and tuple(src[k].shape) != tuple(dst[k].shape)}
    reinit = set(mismatched)
    if any(k.startswith(p) for k in mismatched for p in prefixes):
        reinit |= {k for k in dst if any(k.startswith(p) for p in prefixes)}
    load = {k: src[k] for k in dst if k in src and k not in reinit}
    model.load_state_dict(load, strict=False)
    report = InitReport(
        loaded=sorted(load),
        reinitialized=sorted(reinit),
        missing=sorted(k for k in dst if k not in src),
        unexpected=sorted(k for k in src if k not in dst),
    )
    log.info("init from %s: %s", where, report.summary())
    return report


# --------------------------------------------------------------------------------------------
# metrics log


def write_metrics_csv(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One row per epoch; columns in first-seen order (a value an epoch lacks stays empty)."""
    path = Path(path)
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    return path


def plot_metrics(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Training losses, validation metrics and the learning rate against the epoch, as a PNG."""
    from matplotlib.figure import Figure

    path = Path(path)
    epochs = [row["epoch"] for row in history]
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    panels = [
        ("training losses", [k for k in keys if k.startswith("train_") and "loss" in k]),
        ("validation", [k for k in keys if k.startswith("val_")]),
        ("learning rate", [k for k in keys if k == "lr"]),
    ]
    panels = [(title, ks) for title, ks in panels if ks]
    fig = Figure(figsize=(5 * max(len(panels), 1), 4), layout="constrained")
    for i, (title, ks) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for k in ks:
            ax.plot(epochs, [row.get(k, float("nan")) for row in history], marker="o", ms=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title == "learning rate":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------------------------
# the loop


def _prune_epoch_checkpoints(out_dir: Path, keep: int | None) -> None:
    """Delete all but the ``keep`` newest ``epoch_XXX.pt`` (``None``/0: keep every one)."""
    if not keep:
        return
    for old in sorted(out_dir.glob("epoch_*.pt"))[: -int(keep)]:
        old.unlink()


def _improved(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


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
        train_loader: yields ``(images, targets)``; best made by :func:`build_train_loader`, whose
            order depends only on (seed, epoch) (``set_epoch`` is called on samplers that have it).
        val_fn: ``val_fn(model, epoch) -> {"AP": ..}`` after each ``train.val_every`` epochs, on
            rank 0, the bare model in whatever mode it left; keys are logged as ``val_<key>``.
            ``None``: no validation, ``best.pt`` then follows the lowest training loss.
        cfg: the full resolved config (saved to ``config.yaml`` and in every checkpoint).
        out_dir: the run directory (see the module docstring).
        resume: continue from ``out_dir/last.pt`` (weights, optimiser, scheduler, scaler, epoch,
            history, best, RNG states): the result equals an uninterrupted run's.
        init: a checkpoint whose weights initialise the model (:func:`load_init_weights`; class
            layers re-initialised when the class count differs). Ignored when resuming.
        epochs: total epochs of the run, overriding ``cfg.train.epochs`` (schedule included).
        device: ``cpu``, ``cuda``, or ``None`` for CUDA when available (under DDP each process
            uses ``cuda:LOCAL_RANK``).

    Returns:
        ``{"history": [row per epoch], "best": {"epoch", "metric", "value"} | None,
        "out_dir": Path, "init": InitReport | None, "model": model}``.
    """
    info = init_distributed(device)
    device = info.device
    cfg = to_plain(cfg)
    cfg.setdefault("train", {})
    if epochs is not None:
        cfg["train"]["epochs"] = int(epochs)
    tcfg = train_config(cfg)
    total_epochs = int(tcfg["epochs"])
    seed = int(tcfg["seed"])
    out_dir = Path(out_dir)
    monitor, mode = str(tcfg["monitor"]), str(tcfg["monitor_mode"])
    if val_fn is None:
        monitor, mode = "train_loss", "min"
    if mode not in ("max", "min"):
        raise ValueError(f"train.monitor_mode must be max or min, got {mode!r}")

    iters_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if iters_per_epoch == 0:
        raise ValueError("the training loader is empty (no images, or batch_size too large with drop_last)")
    if not resume:
        seed_everything(seed)
    model.to(device)
    init_report = None
    if init is not None and not resume:
        init_report = load_init_weights(model, init)
    elif init is not None:
        log.info("resuming: --init %s ignored (weights come from last.pt)", init)

    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch, total_epochs)
    use_amp = bool(tcfg["amp"]) and device.type == "cuda" and str(tcfg["amp_dtype"]) == "float16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    start_epoch = 0
    if resume:
        ckpt = load_checkpoint(out_dir / "last.pt", map_location="cpu")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler") and use_amp:
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch = int(ckpt["epoch"])
            history = [dict(row) for row in ckpt.get("history", [])]
            best = dict(ckpt["best"]) if ckpt.get("best") else None
            states = ckpt["rng"]
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{out_dir / 'last.pt'}: cannot resume from it ({exc})") from exc
        set_rng_state(states[info.rank] if len(states) == info.world_size else states[0])
        log.info("resumed from %s after epoch %d", out_dir / "last.pt", start_epoch)

    step: nn.Module = TrainStep(model)
    if info.distributed:
        step = nn.parallel.DistributedDataParallel(
            step,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(tcfg["find_unused_parameters"]),
        )
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    guard = NonFiniteGuard(int(tcfg["max_nonfinite"]))

    for epoch in range(start_epoch, total_epochs):
        start = time.perf_counter()
        set_loader_epoch(train_loader, epoch, seed, info.rank)
        stats = train_one_epoch(
            step, train_loader, optimizer, scheduler, scaler,
            device=device, cfg=cfg, epoch=epoch, guard=guard, info=info,
        )  # fmt: skip
        row: dict[str, Any] = {"epoch": epoch + 1}
        row.update({f"train_{k}": v for k, v in stats.items() if k not in ("lr", "iters")})
        row["lr"] = stats["lr"]
        val_every = max(int(tcfg["val_every"]), 1)
        if (
            val_fn is not None
            and info.is_main
            and ((epoch + 1) % val_every == 0 or epoch + 1 == total_epochs)
        ):
            metrics = val_fn(model, epoch)
            row.update({f"val_{k}": float(v) for k, v in metrics.items()})
        row["time_s"] = round(time.perf_counter() - start, 3)
        history.append(row)
        if monitor in row and _improved(row[monitor], best["value"] if best else None, mode):
            best = {"epoch": epoch + 1, "metric": monitor, "value": float(row[monitor])}
            is_best = True
        else:
            is_best = False

        states = [rng_state()]
        if info.distributed:
            gathered: list[Any] = [None] * info.world_size
            dist.all_gather_object(gathered, states[0])
            states = gathered
        if info.is_main:
            payload = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch + 1,
                "config": cfg,
                "history": history,
                "best": best,
                "rng": states,
                "meta": {"torch": str(torch.__version__), "world_size": info.world_size},
            }
            save_checkpoint(payload, out_dir / "last.pt")
            weights = {
                "model": payload["model"],
                "epoch": epoch + 1,
                "config": cfg,
                "metrics": row,
                "best": best,
            }
            every = max(int(tcfg["checkpoint_every"] or 0), 0)
            if (every and (epoch + 1) % every == 0) or epoch + 1 == total_epochs:
                save_checkpoint(weights, out_dir / f"epoch_{epoch + 1:03d}.pt")
                _prune_epoch_checkpoints(out_dir, tcfg.get("keep_epoch_checkpoints"))
            if is_best:
                save_checkpoint(weights, out_dir / "best.pt")
            write_metrics_csv(history, out_dir / "metrics.csv")
            plot_metrics(history, out_dir / "metrics.png")
            log.info(
                "epoch %d/%d: %s",
                epoch + 1,
                total_epochs,
                _fmt({k: v for k, v in row.items() if k != "epoch"}),
            )
        _barrier(info)

    return {"history": history, "best": best, "out_dir": out_dir, "init": init_report, "model": model}
