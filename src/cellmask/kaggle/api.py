"""The ``kaggle`` command line, driven from Python: who the user is, and each command we run.

Every Kaggle action of the Makefile goes through :class:`KaggleRunner`, which either runs the
``kaggle`` CLI or, in dry-run mode (``DRY_RUN=1``), prints the exact command line instead. The
user name comes from ``KAGGLE_USERNAME`` or the CLI's own ``kaggle.json`` (``$KAGGLE_CONFIG_DIR``,
``~/.kaggle``, or ``$XDG_CONFIG_HOME/kaggle`` as the CLI looks them up), never from this repo.
A missing CLI or missing credentials raise :class:`KaggleSetupError` with one message that says
what to do.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

COMPETITION = "sartorius-cell-instance-segmentation"
SUBMISSION_FILE = "submission.csv"
"""What the inference kernel writes into ``/kaggle/working`` (the file Kaggle scores)."""

_HELP = (
    "install the CLI (pip install kaggle) and put your API token in ~/.kaggle/kaggle.json "
    "(kaggle.com > Settings > API > Create New Token), or set KAGGLE_USERNAME and KAGGLE_KEY"
)


class KaggleSetupError(RuntimeError):
    """The Kaggle CLI or the user's credentials are missing (the message says what to do)."""


class KaggleCommandError(RuntimeError):
    """A ``kaggle`` command failed, or a kernel run ended in error."""


def config_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    """Where the Kaggle CLI looks for ``kaggle.json``, in its order of preference."""
    env = os.environ if env is None else env
    if env.get("KAGGLE_CONFIG_DIR"):
        return [Path(env["KAGGLE_CONFIG_DIR"])]
    home = Path(env.get("HOME") or Path.home())
    xdg = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    return [home / ".kaggle", xdg / "kaggle"]


def _config_file(env: Mapping[str, str]) -> Path | None:
    return next((d / "kaggle.json" for d in config_dirs(env) if (d / "kaggle.json").is_file()), None)


def _read_config(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KaggleSetupError(f"{path}: not a readable kaggle.json ({exc})") from None
    if not isinstance(data, dict):
        raise KaggleSetupError(f"{path}: expected a JSON object with username and key")
    return {str(k): str(v) for k, v in data.items()}


def kaggle_username(env: Mapping[str, str] | None = None) -> str:
    """The Kaggle user name: ``KAGGLE_USERNAME``, else ``username`` of the CLI's ``kaggle.json``.

    Raises:
        KaggleSetupError: neither is there (the message names the places looked at).
    """
    env = os.environ if env is None else env
    if env.get("KAGGLE_USERNAME"):
        return env["KAGGLE_USERNAME"]
    path = _config_file(env)
    if path is not None:
        name = _read_config(path).get("username")
        if name:
            return name
        raise KaggleSetupError(f"{path}: has no username")
    looked = ", ".join(str(d / "kaggle.json") for d in config_dirs(env))
    raise KaggleSetupError(
        f"no Kaggle user name: KAGGLE_USERNAME is not set and there is no {looked}; {_HELP}"
    )


def find_kaggle_cli() -> str | None:
    """The ``kaggle`` executable: beside this Python (a venv's ``bin/``, e.g. ``.venv`` after
    ``pip install kaggle``), else on ``PATH``; ``None`` if neither."""
    beside = Path(sys.executable).parent / "kaggle"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("kaggle")


def check_kaggle_setup(
    env: Mapping[str, str] | None = None, which: Callable[[str], str | None] = lambda _: find_kaggle_cli()
) -> None:
    """Raise one :class:`KaggleSetupError` naming everything missing to run ``kaggle`` commands:
    the CLI on ``PATH``, and credentials (``KAGGLE_USERNAME`` + ``KAGGLE_KEY``, ``kaggle.json``,
    or an access token in ``KAGGLE_API_TOKEN`` / ``access_token`` with a user name)."""
    env = os.environ if env is None else env
    missing = []
    if which("kaggle") is None:
        missing.append("the `kaggle` command is not installed (not beside this Python, not on PATH)")
    has_key = bool(env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"))
    has_file = _config_file(env) is not None
    has_token = bool(env.get("KAGGLE_API_TOKEN")) or any(
        (d / "access_token").is_file() for d in config_dirs(env)
    )
    if not (has_key or has_file or has_token):
        missing.append("no Kaggle credentials were found")
    if missing:
        raise KaggleSetupError(f"{' and '.join(missing)}: {_HELP}")


@dataclass
class KaggleRunner:
    """Runs ``kaggle`` commands, or prints them (``dry_run``) with every real argument.

    Attributes:
        dry_run: print ``$ kaggle ...`` lines instead of running anything.
        out: where dry-run lines and progress go.
        executable: the CLI (tests point it at a fake).
        log: every command line issued, in order (run or printed).
    """

    dry_run: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    executable: str = "kaggle"
    log: list[list[str]] = field(default_factory=list)

    def run(
        self, args: Sequence[str], check: bool = True, echo: bool = True, stream: bool = False
    ) -> subprocess.CompletedProcess:
        """Run ``kaggle ARGS`` (stdout captured and echoed; with ``stream``, not captured: the
        command's output, e.g. a download's progress, goes straight to the terminal); in dry-run
        mode print it and return an empty, successful result.

        Raises:
            KaggleCommandError: a non-zero exit status and ``check`` (the message holds its output).
        """
        cmd = [self.executable, *map(str, args)]
        self.log.append(cmd)
        if self.dry_run:
            print("$ " + shlex.join(cmd), file=self.out, flush=True)
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if stream:
            proc = subprocess.run(cmd)
            if check and proc.returncode != 0:
                raise KaggleCommandError(
                    f"`{shlex.join(cmd)}` failed (exit {proc.returncode}; its output is above)"
                )
            return proc
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if echo and proc.stdout.strip():
            print(proc.stdout.rstrip(), file=self.out, flush=True)
        if check and proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip()
            raise KaggleCommandError(f"`{shlex.join(cmd)}` failed (exit {proc.returncode}): {detail[-800:]}")
        return proc

    def note(self, text: str) -> None:
        """A line of explanation (``#``-prefixed in dry-run mode, so the output stays a script)."""
        print(("# " if self.dry_run else "") + text, file=self.out, flush=True)


# --------------------------------------------------------------------------------------------
# kernels


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


def push_kernel(runner: KaggleRunner, folder: str | Path) -> int | None:
    """``kaggle kernels push -p FOLDER``; returns the new version (``None`` in dry-run mode).

    Raises:
        KaggleCommandError: the push failed, or reported an error.
    """
    proc = runner.run(["kernels", "push", "-p", str(folder)])
    if runner.dry_run:
        return None
    if "push error" in proc.stdout.lower():
        raise KaggleCommandError(f"kaggle kernels push -p {folder}: {proc.stdout.strip()[-800:]}")
    return parse_push_version(proc.stdout)


def wait_for_kernel(
    runner: KaggleRunner,
    kernel_id: str,
    poll_s: float = 60.0,
    timeout_s: float = 12 * 3600.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Poll ``kaggle kernels status KERNEL_ID`` until the run completes.

    Returns:
        ``"complete"`` (``"complete"`` at once in dry-run mode, after printing the command once).

    Raises:
        KaggleCommandError: the run ended in error or was cancelled (with Kaggle's failure
            message and how to fetch the log), or ``timeout_s`` passed.
    """
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
    """``kaggle competitions submit COMPETITION -f submission.csv -k KERNEL_ID -v VERSION -m MESSAGE``."""
    runner.run(
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


# --------------------------------------------------------------------------------------------
# datasets


def dataset_exists(runner: KaggleRunner, dataset_id: str) -> bool | None:
    """Whether ``dataset_id`` exists on Kaggle (``kaggle datasets status``); ``None`` in dry-run mode."""
    proc = runner.run(["datasets", "status", dataset_id], check=False, echo=False)
    if runner.dry_run:
        return None
    return proc.returncode == 0 and "not found" not in (proc.stdout + proc.stderr).lower()


def push_dataset(runner: KaggleRunner, dataset_id: str, folder: str | Path, message: str) -> None:
    """A new version of ``dataset_id`` from ``folder`` (``kaggle datasets version -p FOLDER -r zip
    -m MESSAGE``), or ``kaggle datasets create -p FOLDER -r zip`` the first time."""
    exists = dataset_exists(runner, dataset_id)
    version = ["datasets", "version", "-p", str(folder), "-r", "zip", "-m", message]
    create = ["datasets", "create", "-p", str(folder), "-r", "zip"]
    if exists is None:  # dry run: both, the choice is made by the status above
        runner.run(version)
        runner.note(f"(or, when {dataset_id} does not exist yet: {shlex.join([runner.executable, *create])})")
    elif exists:
        runner.run(version)
    else:
        runner.run(create)
