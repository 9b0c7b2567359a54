"""Who the user is, and running one ``kaggle`` command (or printing it: ``DRY_RUN=1``).

The user name comes from ``KAGGLE_USERNAME`` or the CLI's own ``kaggle.json`` (``$KAGGLE_CONFIG_DIR``,
``~/.kaggle``, or ``$XDG_CONFIG_HOME/kaggle`` as the CLI looks them up), never from this repo.
A missing CLI or missing credentials raise :class:`KaggleSetupError` with one message that says
what to do.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cellmask.kaggle.api.errors import KaggleCommandError, KaggleSetupError
from cellmask.kaggle.api.texts import failure_reason

COMPETITION = "sartorius-cell-instance-segmentation"
SUBMISSION_FILE = "submission.csv"
"""What the inference kernel writes into ``/kaggle/working`` (the file Kaggle scores)."""

_HELP = (
    "install the CLI (pip install kaggle) and put your API token in ~/.kaggle/kaggle.json "
    "(kaggle.com > Settings > API > Create New Token), or set KAGGLE_USERNAME and KAGGLE_KEY"
)


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
            reason = failure_reason(f"{proc.stdout}\n{proc.stderr}")
            why = f", {reason}" if reason else ""
            raise KaggleCommandError(
                f"`{shlex.join(cmd)}` failed (exit {proc.returncode}{why}): {detail[-800:]}"
            )
        return proc

    def note(self, text: str) -> None:
        """A line of explanation (``#``-prefixed in dry-run mode, so the output stays a script)."""
        print(("# " if self.dry_run else "") + text, file=self.out, flush=True)
