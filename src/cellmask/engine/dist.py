"""Devices and distributed training: where this process stands, the process group, and the
shard / gather helpers every validation function uses (contract 3).

Under ``torchrun`` (``WORLD_SIZE > 1``) :func:`init_distributed` joins the process group from the
environment (NCCL on CUDA, Gloo on CPU). Validation runs on every rank: a ``val_fn`` evaluates
``shard(items, info)`` and combines the ranks' results with :func:`gather_objects` (then
:func:`unshard` restores the items' order, or :func:`merge_means` weights per-shard means), so
every rank returns the same metrics and no rank waits for another one's long evaluation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


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


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed:
        dist.barrier()


def gather_objects(obj: T, info: DistInfo) -> list[T]:
    """Every rank's ``obj`` in rank order (``all_gather_object``: call it on every rank);
    ``[obj]`` in a single process. ``obj`` must pickle (tensors are best moved to the CPU)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """This rank's share of ``items``: ``items[rank::world_size]`` (all of them in one process)."""
    return list(items)[info.rank :: info.world_size]


def unshard(parts: Sequence[Sequence[T]]) -> list[T]:
    """The inverse of :func:`shard`: ``parts[r]`` is rank ``r``'s shard -> the items in their
    original order (``parts`` as :func:`gather_objects` returns them)."""
    world = len(parts)
    sizes = [len(p) for p in parts]
    total = sum(sizes)
    if sizes != [len(range(rank, total, world)) for rank in range(world)]:
        raise ValueError(f"shard sizes {sizes} are not items[rank::{world}] of {total} items")
    out: list[Any] = [None] * total
    for rank, part in enumerate(parts):
        out[rank::world] = list(part)
    return out


def merge_means(parts: Sequence[Mapping[str, float]], weights: Mapping[str, str]) -> dict[str, float]:
    """Combine per-shard metrics: each ``metric`` in ``weights`` is the mean of the shards' values
    weighted by their count ``weights[metric]``; counts are summed.

    Example: ``merge_means(parts, {"mIoU": "instances", "mIoU_image": "images"})``. A shard with
    count 0 does not contribute (its mean may be NaN); a metric no shard has a count for is NaN.
    One part is returned unchanged (nothing to weight, counts optional).

    Raises:
        ValueError: a part lacks a metric or its count, or holds a key no rule merges.
    """
    if len(parts) == 1:
        return dict(parts[0])
    counts = set(weights.values())
    merged: dict[str, float] = {}
    for rank, part in enumerate(parts):
        missing = [k for k in (*weights, *counts) if k not in part]
        unknown = [k for k in part if k not in weights and k not in counts]
        if missing or unknown:
            problem = (
                f"lacks {', '.join(missing)}"
                if missing
                else f"has {', '.join(unknown)}, which no rule merges"
            )
            raise ValueError(f"shard {rank}'s metrics {problem} (weights: {dict(weights)})")
    for count in counts:
        merged[count] = float(sum(float(p[count]) for p in parts))
    for metric, count in weights.items():
        total = sum(float(p[count]) for p in parts if float(p[count]) > 0)
        weighted = sum(float(p[metric]) * float(p[count]) for p in parts if float(p[count]) > 0)
        merged[metric] = weighted / total if total > 0 else math.nan
    return {k: merged[k] for k in parts[0]}
