"""Datasets: status (``ready``, processing, missing: told from "could not ask") and current
version number, waiting until the version a push created is the one Kaggle serves, and
versioning or creating one."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
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


def parse_status_json(output: str) -> tuple[str, int | None]:
    """``(status, current version number)`` from what ``kaggle datasets status ID --format json``
    printed: its last line that is a JSON object with a ``status`` (kaggle 2.2.5 prints
    ``{"status": "ready", "current_version_number": 3}``; warnings may come first).

    Raises:
        KaggleCommandError: no such line, or an unknown status.
    """
    for line in reversed(output.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "status" in data:
            status = parse_dataset_status(str(data["status"]))
            number = data.get("current_version_number")
            return status, int(number) if number is not None else None
    raise KaggleCommandError(f"could not read a dataset status from: {output.strip()[:300]!r}")


def dataset_version_status(runner: KaggleRunner, dataset_id: str) -> tuple[str, int | None]:
    """``(status, current version number)`` of ``dataset_id`` (``kaggle datasets status ID --format
    json``, kaggle >= 2.2.5). The number is ``None`` when the CLI cannot tell it (an older CLI
    without ``--format``: its plain status is asked then) and in dry-run mode (status ``ready``).

    Raises:
        KaggleCommandError: Kaggle could not be asked (the message says why).
    """
    proc = runner.run(["datasets", "status", dataset_id, "--format", "json"], check=False, echo=False)
    if runner.dry_run:
        return DATASET_READY, None
    output = f"{proc.stdout or ''}\n{proc.stderr or ''}"
    if proc.returncode != 0 and "unrecognized arguments" in output:  # kaggle < 2.2.5
        return dataset_status(runner, dataset_id), None
    if proc.returncode == 0:
        try:
            return parse_status_json(proc.stdout or "")
        except KaggleCommandError:
            pass  # a plain status (an older CLI that ignores --format), or what it says is wrong
    return _read_dataset_status(dataset_id, proc), None


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
    version: int | None = None,
) -> str:
    """Poll ``kaggle datasets status DATASET_ID --format json`` until Kaggle serves the version a
    kernel should mount: ``version`` (the one a push created: :func:`push_dataset`) or a newer
    one, processed (``ready``); without ``version``, the newest one, processed. A kernel pushed
    before then mounts the previous version.

    Returns:
        ``"ready"`` (at once in dry-run mode, after printing the command once).

    Raises:
        KaggleCommandError: the dataset does not exist, its processing failed, Kaggle could not
            be asked, or ``timeout_s`` passed (the message says which version was expected and
            which one Kaggle serves).
    """
    if runner.dry_run:
        runner.run(["datasets", "status", dataset_id, "--format", "json"], check=False, echo=False)
        until = f"the current version is {version} or newer and" if version else "the newest version is"
        runner.note(f"(repeated every {poll_s:g} s until {until} ready)")
        return DATASET_READY
    waited = 0.0
    while True:
        status, current = dataset_version_status(runner, dataset_id)
        if status == DATASET_MISSING:
            raise KaggleCommandError(f"{dataset_id} does not exist on Kaggle; run `make push-datasets` first")
        serving = f"version {current}" if current is not None else "its latest version"
        runner.note(f"{dataset_id}: {serving} {status} ({waited / 60:.0f} min)")
        if status in DATASET_FAILED:
            raise KaggleCommandError(
                f"{dataset_id}: its latest version is {status}; see https://www.kaggle.com/datasets/{dataset_id} "
                "and push it again (make push-datasets)"
            )
        behind = version is not None and current is not None and current < version
        if status == DATASET_READY and not behind:
            if version is not None and current is None:
                runner.note(
                    f"{dataset_id}: this CLI does not report version numbers; ready taken as version {version}"
                )
            return status
        if waited >= timeout_s:
            wanted = f"version {version}" if version is not None else "its newest version"
            raise KaggleCommandError(
                f"{dataset_id}: Kaggle still serves {serving} ({status}) after {timeout_s / 60:.0f} min, "
                f"not {wanted} (the one pushed); stopped waiting: push again once "
                f"https://www.kaggle.com/datasets/{dataset_id} shows it"
            )
        sleep(poll_s)
        waited += poll_s


def wait_for_datasets(
    runner: KaggleRunner,
    dataset_ids: Sequence[str],
    poll_s: float = 30.0,
    timeout_s: float = 2 * 3600.0,
    sleep: Callable[[float], None] = time.sleep,
    versions: Mapping[str, int] | None = None,
) -> None:
    """:func:`wait_for_dataset` for each of ``dataset_ids`` in turn (e.g. a kernel's
    ``dataset_sources``), each until ``versions[id]`` when given: one status call each when they
    are live already."""
    for dataset_id in dataset_ids:
        version = (versions or {}).get(dataset_id)
        wait_for_dataset(runner, dataset_id, poll_s=poll_s, timeout_s=timeout_s, sleep=sleep, version=version)


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


def push_dataset(runner: KaggleRunner, dataset_id: str, folder: str | Path, message: str) -> int | None:
    """A new version of ``dataset_id`` from ``folder`` (``kaggle datasets version -p FOLDER -r zip
    -m MESSAGE``), or ``kaggle datasets create -p FOLDER -r zip`` when Kaggle says it does not exist.

    Returns:
        the number the new version will have (the current one + 1; 1 for a new dataset), or
        ``None`` when it cannot be told (dry run; a CLI that reports no version numbers).

    Raises:
        KaggleCommandError: Kaggle could not be asked whether it exists (nothing is uploaded
            then), or the upload failed or printed one of :data:`DATASET_ERRORS`.
    """
    version = ["datasets", "version", "-p", str(folder), "-r", "zip", "-m", message]
    create = ["datasets", "create", "-p", str(folder), "-r", "zip"]
    if runner.dry_run:  # both, the choice is made by the status
        runner.run(["datasets", "status", dataset_id, "--format", "json"], check=False, echo=False)
        runner.run(version)
        runner.note(f"(or, when {dataset_id} does not exist yet: {shlex.join([runner.executable, *create])})")
        return None
    status, current = dataset_version_status(runner, dataset_id)
    exists = status != DATASET_MISSING
    _run_dataset_upload(runner, version if exists else create)
    if not exists:
        return 1
    return current + 1 if current is not None else None
