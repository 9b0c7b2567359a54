"""Datasets: status (``ready``, processing, missing: told from "could not ask"), waiting until
ready, and versioning or creating one."""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cellmask.kaggle.api.errors import KaggleCommandError
from cellmask.kaggle.api.runner import KaggleRunner
from cellmask.kaggle.api.texts import DATASET_ERRORS, NOT_FOUND, failure_reason, raise_on_cli_errors

DATASET_READY = "ready"
DATASET_FAILED = ("failed", "deleted", "error")
DATASET_PENDING = (
    "not_yet_persisted",
    "blobs_received",
    "blobs_decompressed",
    "blobs_copied_to_sds",
    "individual_blobs_compressed",
    "reprocessing",
    "pending",
)
"""What ``kaggle datasets status`` prints: kagglesdk's ``DatabundleVersionStatus`` names in lower
case (kaggle 2.2.5), plus ``pending`` / ``error`` of older CLIs."""
DATASET_MISSING = "missing"
""":func:`dataset_status` of a dataset Kaggle says does not exist (HTTP 404)."""


def parse_dataset_status(output: str) -> str:
    """The status ``kaggle datasets status`` printed (its last line that is one; warnings such
    as the CLI's "outdated version" line may come first).

    Raises:
        KaggleCommandError: no known status in the output.
    """
    known = (DATASET_READY, *DATASET_FAILED, *DATASET_PENDING)
    found = [line.strip().lower() for line in output.splitlines() if line.strip().lower() in known]
    if not found:
        raise KaggleCommandError(f"could not read a dataset status from: {output.strip()[:300]!r}")
    return found[-1]


def _read_dataset_status(dataset_id: str, proc: subprocess.CompletedProcess) -> str:
    """The status in ``proc`` (a run of ``kaggle datasets status DATASET_ID``), or
    :data:`DATASET_MISSING` when Kaggle answered "not found".

    Raises:
        KaggleCommandError: Kaggle could not be asked (credentials, rate limit, server error,
            access denied, unreadable output): the message says so and why.
    """
    output = f"{proc.stdout or ''}\n{proc.stderr or ''}"
    if proc.returncode == 0:
        try:
            return parse_dataset_status(proc.stdout or "")
        except KaggleCommandError as exc:
            reason = str(exc)
    else:
        reason = failure_reason(output) or f"exit {proc.returncode}"
        if reason == NOT_FOUND:
            return DATASET_MISSING
        reason = f"{reason}: {output.strip()[-400:]}"
    raise KaggleCommandError(
        f"could not ask Kaggle for the status of {dataset_id} (`kaggle datasets status {dataset_id}`): "
        f"{reason}; nothing was created or uploaded"
    )


def dataset_status(runner: KaggleRunner, dataset_id: str) -> str:
    """``kaggle datasets status DATASET_ID``: ``ready``, a pending or failed status (see
    :data:`DATASET_PENDING`, :data:`DATASET_FAILED`), or :data:`DATASET_MISSING` (404);
    ``ready`` in dry-run mode, after printing the command.

    Raises:
        KaggleCommandError: Kaggle could not be asked (the message says why).
    """
    proc = runner.run(["datasets", "status", dataset_id], check=False, echo=False)
    return DATASET_READY if runner.dry_run else _read_dataset_status(dataset_id, proc)


def dataset_exists(runner: KaggleRunner, dataset_id: str) -> bool | None:
    """Whether ``dataset_id`` exists on Kaggle (``kaggle datasets status``); ``None`` in dry-run mode.

    ``False`` only when Kaggle says "not found"; anything else that is not a status raises, so
    a failed question never leads to ``datasets create``.

    Raises:
        KaggleCommandError: Kaggle could not be asked (credentials, rate limit, server error,
            access denied, unreadable output).
    """
    if runner.dry_run:
        runner.run(["datasets", "status", dataset_id], check=False, echo=False)
        return None
    return dataset_status(runner, dataset_id) != DATASET_MISSING


def wait_for_dataset(
    runner: KaggleRunner,
    dataset_id: str,
    poll_s: float = 30.0,
    timeout_s: float = 2 * 3600.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Poll ``kaggle datasets status DATASET_ID`` until Kaggle has processed its latest version
    (a kernel pushed before that mounts the previous version).

    Returns:
        ``"ready"`` (at once in dry-run mode, after printing the command once).

    Raises:
        KaggleCommandError: the dataset does not exist, its processing failed, Kaggle could not
            be asked, or ``timeout_s`` passed.
    """
    if runner.dry_run:
        runner.run(["datasets", "status", dataset_id], check=False, echo=False)
        runner.note(f"(repeated every {poll_s:g} s until the status is ready)")
        return DATASET_READY
    waited = 0.0
    while True:
        status = dataset_status(runner, dataset_id)
        if status == DATASET_MISSING:
            raise KaggleCommandError(f"{dataset_id} does not exist on Kaggle; run `make push-datasets` first")
        runner.note(f"{dataset_id}: {status} ({waited / 60:.0f} min)")
        if status == DATASET_READY:
            return status
        if status in DATASET_FAILED:
            raise KaggleCommandError(
                f"{dataset_id}: its latest version is {status}; see https://www.kaggle.com/datasets/{dataset_id} "
                "and push it again (make push-datasets)"
            )
        if waited >= timeout_s:
            raise KaggleCommandError(
                f"{dataset_id} still {status} after {timeout_s / 60:.0f} min; stopped waiting"
            )
        sleep(poll_s)
        waited += poll_s


def wait_for_datasets(
    runner: KaggleRunner,
    dataset_ids: Sequence[str],
    poll_s: float = 30.0,
    timeout_s: float = 2 * 3600.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """:func:`wait_for_dataset` for each of ``dataset_ids`` in turn (e.g. a kernel's
    ``dataset_sources``): one status call each when they are ready already."""
    for dataset_id in dataset_ids:
        wait_for_dataset(runner, dataset_id, poll_s=poll_s, timeout_s=timeout_s, sleep=sleep)


def _run_dataset_upload(runner: KaggleRunner, args: list[str]) -> None:
    """Run ``kaggle datasets version/create ...`` and read what it printed.

    Raises:
        KaggleCommandError: it failed, or printed one of :data:`DATASET_ERRORS`.
    """
    proc = runner.run(args)
    if runner.dry_run:
        return
    raise_on_cli_errors(proc, DATASET_ERRORS)
    if "is being created" not in proc.stdout:
        runner.note(f"warning: `kaggle {shlex.join(args)}` did not say a version is being created")


def push_dataset(runner: KaggleRunner, dataset_id: str, folder: str | Path, message: str) -> None:
    """A new version of ``dataset_id`` from ``folder`` (``kaggle datasets version -p FOLDER -r zip
    -m MESSAGE``), or ``kaggle datasets create -p FOLDER -r zip`` when Kaggle says it does not exist.

    Raises:
        KaggleCommandError: Kaggle could not be asked whether it exists (nothing is uploaded
            then), or the upload failed or printed one of :data:`DATASET_ERRORS`.
    """
    exists = dataset_exists(runner, dataset_id)
    version = ["datasets", "version", "-p", str(folder), "-r", "zip", "-m", message]
    create = ["datasets", "create", "-p", str(folder), "-r", "zip"]
    if exists is None:  # dry run: both, the choice is made by the status above
        runner.run(version)
        runner.note(f"(or, when {dataset_id} does not exist yet: {shlex.join([runner.executable, *create])})")
    else:
        _run_dataset_upload(runner, version if exists else create)
