"""Launch a function on several processes, as ``torchrun`` would, from inside a Python session
(a Kaggle notebook: both GPUs of a T4 x2 train one DDP run).

Each process gets the rendezvous environment :func:`cellmask.engine.dist.init_distributed`
reads (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) and runs
``fn(*args)``; rank 0's return value comes back to the caller. Processes are *spawned*, so
``fn`` must be importable (a module-level function of a module, not of ``__main__``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port free on this machine now (the rendezvous of the launched processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment ``torchrun`` gives process ``rank`` of ``world`` on this machine."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
    }


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    os.environ.update(rank_env(rank, world, port))
    value = fn(*args)
    if rank == 0:
        results.put(value)


def launch(fn: Callable[..., Any], processes: int, *args: Any, timeout_s: float | None = None) -> Any:
    """Run ``fn(*args)`` in ``processes`` spawned processes forming one process group; returns
    rank 0's value (it must pickle). With one process, ``fn(*args)`` runs here.

    Raises:
        RuntimeError: a process failed (its traceback is in the message) or ``timeout_s`` passed
            (every process is then killed).
    """
    if processes <= 1:
        return fn(*args)
    import time

    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    context = mp.spawn(
        _rank_main, args=(processes, free_port(), fn, args, results), nprocs=processes, join=False
    )
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"the {processes} launched processes did not finish in {timeout_s:.0f} s")
    except Exception as exc:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        raise RuntimeError(f"a launched process failed: {exc}") from exc
    if results.empty():
        raise RuntimeError("rank 0 returned nothing")
    return results.get()
