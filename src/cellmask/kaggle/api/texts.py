"""What the ``kaggle`` CLI prints, as kaggle 2.2.5 prints it, and the accelerators it documents.

Its ``main`` exits 1 only when an exception reached it: the errors below come with exit status
0, so a command's output is read as well as its status. ``tests/fixtures/kaggle_cli/README.md``
says where each text comes from.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence

from cellmask.kaggle.api.errors import KaggleCommandError

PUSH_ERRORS = (
    "Kernel push error",
    "are not valid dataset sources",
    "are not valid competition sources",
    "are not valid kernel sources",
)
"""Lines of ``kaggle kernels push`` that mean the kernel did not get what its metadata asks for."""
DATASET_ERRORS = ("Dataset version creation error", "Dataset creation error", "are not valid tags")
"""Lines of ``kaggle datasets version/create`` that mean no (good) version is being created
(with invalid tags the CLI prints neither its success nor its error line)."""
SUBMIT_ERRORS = ("Could not submit to competition", "Could not find competition")
"""Lines of ``kaggle competitions submit`` that mean nothing was submitted (exit 0 before 2.2.5)."""
_HINTS = {
    "are not valid dataset sources": "the kernel was saved and runs without them: `make push-datasets`, "
    "wait until `kaggle datasets status` says ready, then push again",
    "are not valid kernel sources": "the kernel was saved and runs without them: push and run those kernels first",
    "are not valid competition sources": "the kernel was saved and runs without them: accept the competition's rules",
}
_FAILURES = (
    ("authentication failed (HTTP 401 or no credentials)", ("Authentication required", "401 Client Error")),
    ("rate limited (HTTP 429)", ("You have been rate limited", "429 Client Error", "Too Many Requests")),
    ("a server error (HTTP 5xx)", ("a problem on Kaggle's side", "Server Error")),
    (
        "access denied (HTTP 403)",
        ("You don't have access to this resource", "403 Client Error", "was denied"),
    ),
    ("not found (HTTP 404)", ("The resource was not found", "404 Client Error", "Not Found", "(404)")),
)
NOT_FOUND = _FAILURES[-1][0]


def failure_reason(output: str) -> str | None:
    """Why a ``kaggle`` command failed, from its output: authentication, rate limit, server error,
    access denied or :data:`NOT_FOUND` (the CLI's hints and the HTTP error); ``None`` if none shows."""
    return next((reason for reason, marks in _FAILURES if any(m in output for m in marks)), None)


def error_lines(output: str, markers: Sequence[str]) -> list[str]:
    """The lines of ``output`` that hold one of ``markers`` (the CLI's error texts), stripped."""
    return [line.strip() for line in output.splitlines() if any(m in line for m in markers)]


def raise_on_cli_errors(proc: subprocess.CompletedProcess, markers: Sequence[str]) -> None:
    """Raise if the output of ``proc`` holds one of the CLI's error texts ``markers``, whatever
    its exit status.

    Raises:
        KaggleCommandError: quoting each such line (and what to do, where known).
    """
    found = error_lines(f"{proc.stdout or ''}\n{proc.stderr or ''}", markers)
    if not found:
        return
    hints = [hint for mark, hint in _HINTS.items() if any(mark in line for line in found)]
    cmd = shlex.join(map(str, proc.args)) if isinstance(proc.args, list) else str(proc.args)
    raise KaggleCommandError(
        f"`{cmd}` reported an error (exit {proc.returncode}): "
        + " / ".join(found)
        + "".join(f"; {h}" for h in hints)
    )


ACCELERATORS = (
    "NvidiaTeslaT4",
    "NvidiaTeslaA100",
    "NvidiaL4",
    "TpuV5E8",
    "NvidiaL4X1",
    "TpuV6E8",
    "NvidiaH100",
    "NvidiaRtxPro6000",
)
"""``kaggle kernels push --accelerator`` values kaggle 2.2.5 documents (its ``docs/kernels.md``,
"Accelerators available as of Sep 2026"; some only for some competitions or for Kaggle admins)."""
RETIRED_ACCELERATORS = {
    "NvidiaTeslaP100": "the default GPU (NvidiaTeslaT4)",
    "TpuV38": "the default TPU (TpuV5E8)",
    "Tpu1VmV38": "the default TPU (TpuV5E8)",
    "TpuV232": "CPU, with no accelerator",
    "TpuV2256": "CPU, with no accelerator",
}
"""Retired values and what Kaggle runs instead (kaggle 2.2.5 ``_RETIRED_ACCELERATORS`` and its
CHANGELOG): the CLI accepts them with a warning, so a run would silently get another machine."""
_ACCELERATOR_NAMES = {"NvidiaTeslaT4": "GPU T4 x2", "TpuV5E8": "TPU v5e-8"}


def check_accelerator(value: str) -> str:
    """The documented spelling of accelerator ``value`` (compared ignoring case).

    Raises:
        ValueError: a retired or unknown value (the message lists the documented ones).
    """
    known = {name.lower(): name for name in ACCELERATORS}
    retired = {name.lower(): name for name in RETIRED_ACCELERATORS}
    key = value.strip().lower()
    if key in known:
        return known[key]
    listed = ", ".join(
        f"{a} ({_ACCELERATOR_NAMES[a]})" if a in _ACCELERATOR_NAMES else a for a in ACCELERATORS
    )
    if key in retired:
        name = retired[key]
        raise ValueError(
            f"accelerator {name} is retired: Kaggle would run the kernel on {RETIRED_ACCELERATORS[name]} "
            f"instead; pick one of {listed}"
        )
    raise ValueError(f"unknown accelerator {value!r}; kaggle 2.2.5 documents {listed}")
