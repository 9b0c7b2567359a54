"""Kernels: push (with an accelerator), poll one version's run, submit its output."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from cellmask.kaggle.api.errors import KaggleCommandError
from cellmask.kaggle.api.runner import COMPETITION, SUBMISSION_FILE, KaggleRunner
from cellmask.kaggle.api.texts import (
    PUSH_ERRORS,
    SUBMIT_ERRORS,
    check_accelerator,
    error_lines,
    raise_on_cli_errors,
)

_PUSH_VERSION = re.compile(r"[Kk]ernel version (\d+) successfully pushed")
_STATUS = re.compile(r'has status "(?:KernelWorkerStatus\.)?([A-Za-z_]+)"')
_FAILURE = re.compile(r'Failure message: "(.*)"')
DONE, FAILED = (
    "complete",
    ("error", "cancelrequested", "cancelacknowledged", "cancel_requested", "cancel_acknowledged"),
)


def parse_push_version(output: str) -> int | None:
    """The version number ``kaggle kernels push`` reports, or ``None`` if it printed none."""
    match = _PUSH_VERSION.search(output)
    return int(match.group(1)) if match else None


def parse_status(output: str) -> str:
    """``queued`` / ``running`` / ``complete`` / ``error`` / ... from ``kaggle kernels status``
    (both the old ``"complete"`` and the newer ``"KernelWorkerStatus.COMPLETE"`` forms).

    Raises:
        KaggleCommandError: no status in the output.
    """
    match = _STATUS.search(output)
    if not match:
        raise KaggleCommandError(f"could not read a kernel status from: {output.strip()[:300]!r}")
    return match.group(1).lower()


def push_kernel(runner: KaggleRunner, folder: str | Path, accelerator: str | None = None) -> int | None:
    """``kaggle kernels push -p FOLDER [--accelerator ACCELERATOR]``; returns the new version
    (``None`` in dry-run mode, or when the CLI printed none: a note then says so).

    Raises:
        KaggleCommandError: the push failed, or printed one of :data:`PUSH_ERRORS` (also with
            exit status 0: an invalid source leaves the kernel running without that input).
        ValueError: an accelerator :func:`check_accelerator` does not know.
    """
    args = ["kernels", "push", "-p", str(folder)]
    if accelerator:
        args += ["--accelerator", check_accelerator(accelerator)]
    proc = runner.run(args)
    if runner.dry_run:
        return None
    raise_on_cli_errors(proc, PUSH_ERRORS)
    for line in error_lines(proc.stdout, ["are not valid tags"]):
        runner.note(f"warning: {line}")
    version = parse_push_version(proc.stdout)
    if version is None:
        runner.note(f"warning: `kaggle kernels push -p {folder}` printed no pushed version number")
    return version


def kernel_ref(kernel_id: str, version: int | str | None = None) -> str:
    """``USER/SLUG/VERSION`` (the form ``kaggle kernels status/output`` take), or ``kernel_id``
    without a version."""
    return f"{kernel_id}/{version}" if version not in (None, "") else kernel_id


def wait_for_kernel(
    runner: KaggleRunner,
    kernel_id: str,
    poll_s: float = 60.0,
    timeout_s: float = 12 * 3600.0,
    sleep: Callable[[float], None] = time.sleep,
    version: int | str | None = None,
) -> str:
    """Poll ``kaggle kernels status KERNEL_ID[/VERSION]`` until the run completes.

    With ``version`` (what :func:`push_kernel` returned) the status is that version's: right
    after a push, ``KERNEL_ID`` alone can still report the previous run. kaggle >= 2.2.5 honours
    the version (older CLIs answer for the latest version whatever is given).

    Returns:
        ``"complete"`` (``"complete"`` at once in dry-run mode, after printing the command once).

    Raises:
        KaggleCommandError: the run ended in error or was cancelled (with Kaggle's failure
            message and how to fetch the log), or ``timeout_s`` passed.
    """
    kernel_id = kernel_ref(kernel_id, version)
    if runner.dry_run:
        runner.run(["kernels", "status", kernel_id])
        runner.note(f"(repeated every {poll_s:g} s until the status is complete)")
        return DONE
    waited = 0.0
    while True:
        proc = runner.run(["kernels", "status", kernel_id], echo=False)
        status = parse_status(proc.stdout)
        runner.note(f"{kernel_id}: {status} ({waited / 60:.0f} min)")
        if status == DONE:
            return status
        if status in FAILED:
            failure = _FAILURE.search(proc.stdout)
            why = f": {failure.group(1)}" if failure else ""
            raise KaggleCommandError(
                f"{kernel_id} ended with status {status}{why}; its log: kaggle kernels output {kernel_id} -p build/kaggle/output"
            )
        if waited >= timeout_s:
            raise KaggleCommandError(
                f"{kernel_id} still {status} after {timeout_s / 3600:.1f} h; stopped waiting"
            )
        sleep(poll_s)
        waited += poll_s


def submit_kernel(runner: KaggleRunner, kernel_id: str, version: int | str, message: str) -> None:
    """``kaggle competitions submit COMPETITION -f submission.csv -k KERNEL_ID -v VERSION -m MESSAGE``.

    Raises:
        KaggleCommandError: it failed, or printed one of :data:`SUBMIT_ERRORS`.
    """
    proc = runner.run(
        [
            "competitions",
            "submit",
            COMPETITION,
            "-f",
            SUBMISSION_FILE,
            "-k",
            kernel_id,
            "-v",
            str(version),
            "-m",
            message,
        ]
    )
    if not runner.dry_run:
        raise_on_cli_errors(proc, SUBMIT_ERRORS)
