"""Peak memory of a run, for the benchmarks: the accelerator's allocator on CUDA, else the
process's peak resident set."""

from __future__ import annotations

import resource
from typing import Any

__all__ = ["GB", "peak_memory_gb", "reset_peak"]

GB = 1 << 30


def peak_memory_gb(device: Any) -> float:
    """GiB: ``torch.cuda.max_memory_allocated`` on a CUDA ``device``, else the process's peak RSS
    so far (Linux reports it in kB)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def reset_peak(device: Any) -> None:
    """Start a new peak on a CUDA ``device`` (cached blocks freed first); nothing on a CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
