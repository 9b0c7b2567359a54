"""The competition data on this machine (``make data``): ``kaggle competitions download``, then
the zip unpacked into a Kaggle-layout root (``train.csv``, ``train/``, ``test/``,
``train_semi_supervised/``, ``LIVECell_dataset_2021/``) that ``--data`` / ``CELLMASK_DATA`` take.

The download needs the CLI, an API token, and the competition's rules accepted once on
kaggle.com (else Kaggle answers 403 Forbidden).
"""

from __future__ import annotations

import shlex
import sys
import zipfile
from pathlib import Path

from cellmask.errors import DataError
from cellmask.kaggle import api
from cellmask.kaggle.api import COMPETITION, KaggleCommandError, KaggleRunner, KaggleSetupError

DEFAULT_DIR = Path("data/sartorius")
"""Where ``download-data`` unpacks by default (``/data/`` is git-ignored)."""

RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
REQUIRED = ("train.csv", "train")
"""What a root must hold to train on (``cellmask train --data``)."""


def zip_path(directory: str | Path) -> Path:
    """Where ``kaggle competitions download -p DIRECTORY`` writes the competition's zip."""
    return Path(directory) / f"{COMPETITION}.zip"


def download_command(directory: str | Path) -> list[str]:
    """``competitions download -c COMPETITION -p DIRECTORY`` (the ``kaggle`` arguments)."""
    return ["competitions", "download", "-c", COMPETITION, "-p", str(directory)]


def missing(directory: str | Path) -> list[str]:
    """The names of :data:`REQUIRED` that ``directory`` lacks (empty: it can be trained on)."""
    return [name for name in REQUIRED if not (Path(directory) / name).exists()]


def check_cli() -> str:
    """The ``kaggle`` executable.

    Raises:
        KaggleSetupError: not installed (the message says how to install it).
    """
    cli = api.runner.find_kaggle_cli()
    if cli is None:
        raise KaggleSetupError(
            "the `kaggle` command is not installed (not beside this Python, not on PATH): install it "
            "with `.venv/bin/pip install kaggle` (the venv of make setup), then put your API token in "
            "~/.kaggle/kaggle.json (kaggle.com > Settings > API > Create New Token)"
        )
    return cli


def download(runner: KaggleRunner, directory: str | Path) -> Path:
    """``kaggle competitions download -c COMPETITION -p DIRECTORY`` (its progress shown as it
    goes); returns the zip's path.

    Raises:
        KaggleCommandError: the download failed (a 403 is explained: the rules to accept).
    """
    directory = Path(directory)
    if not runner.dry_run:
        directory.mkdir(parents=True, exist_ok=True)
    try:
        runner.run(download_command(directory), stream=True)
    except KaggleCommandError as exc:
        raise KaggleCommandError(
            f"{exc}; if Kaggle answered 403 Forbidden, accept the competition's rules at {RULES_URL} "
            "(once, with the account of your API token) and run it again"
        ) from None
    return zip_path(directory)


def unpack(archive: str | Path, directory: str | Path, out=None) -> None:
    """Extract ``archive`` into ``directory`` (``python -m zipfile -e``: member paths are kept
    inside it), then delete the archive.

    Raises:
        DataError: the archive is missing or not a zip file.
    """
    archive, directory = Path(archive), Path(directory)
    if not archive.is_file():
        raise DataError(f"{archive}: no such file (the download should have written it)")
    print(f"unpacking {archive} into {directory} ...", file=out or sys.stdout, flush=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(directory)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive}: not a readable zip file ({exc}); delete it and download again") from None
    archive.unlink()


def describe(directory: str | Path) -> str:
    """One line per part of the layout found under ``directory`` (files counted)."""
    directory = Path(directory)
    lines = []
    for name in ("train.csv", "train", "test", "train_semi_supervised", "LIVECell_dataset_2021"):
        path = directory / name
        if path.is_dir():
            lines.append(f"  {name}/ ({sum(1 for p in path.rglob('*') if p.is_file())} files)")
        elif path.is_file():
            lines.append(f"  {name} ({path.stat().st_size / 1e6:.1f} MB)")
    return "\n".join(lines)


def download_data(runner: KaggleRunner, directory: str | Path, force: bool = False) -> Path:
    """Download and unpack the competition data into ``directory``; returns it.

    A ``directory`` that already holds ``train.csv`` and ``train/`` is left alone unless
    ``force``. In dry-run mode the download and the unpacking are printed, not run.

    Raises:
        KaggleSetupError: no ``kaggle`` CLI, or no credentials (not checked in dry-run mode).
        KaggleCommandError: the download failed.
        DataError: the archive is unreadable, or lacks ``train.csv`` / ``train/``.
    """
    directory = Path(directory)
    if not force and not missing(directory):
        runner.note(
            f"{directory} already holds the competition data (train.csv, train/); --force downloads it again"
        )
        return directory
    if not runner.dry_run:
        runner.executable = check_cli()
        api.check_kaggle_setup()
    archive = download(runner, directory)
    if runner.dry_run:
        print(f"$ {shlex.join([Path(sys.executable).name, '-m', 'zipfile', '-e', str(archive), str(directory)])}",
              file=runner.out, flush=True)  # fmt: skip
        print(f"$ {shlex.join(['rm', str(archive)])}", file=runner.out, flush=True)
        runner.note(
            f"then {directory} holds train.csv and train/: --data {directory} or CELLMASK_DATA={directory}"
        )
        return directory
    if archive.is_file():  # the CLI leaves the zip (it unpacks nothing for competitions)
        unpack(archive, directory, runner.out)
    lacking = missing(directory)
    if lacking:
        raise DataError(
            f"{directory}: no {' or '.join(lacking)} after the download; is this the competition's archive?"
        )
    print(f"competition data in {directory}:\n{describe(directory)}", file=runner.out, flush=True)
    print(f"use it with --data {directory} (or CELLMASK_DATA={directory})", file=runner.out, flush=True)
    return directory
