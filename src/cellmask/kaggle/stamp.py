"""Which code a build carries, so that a kernel runs the code that was pushed.

A :class:`BuildStamp` names the checkout a wheel and a code dataset were built from: the commit,
whether the sources differed from it (``dirty``: ``git status`` of :data:`STAMPED_PARTS`) and a
digest of those sources. Its :attr:`~BuildStamp.version` is cellmask's version with the commit as
a PEP 440 local label: ``0.1.0+gabc1234`` for a clean checkout, ``0.1.0+gabc1234.dirty.3f9a0c21e4``
for one with changes (the digest tells two dirty builds apart).

Every ``make wheels`` / ``make push-datasets`` builds cellmask's wheel from a staged copy of the
working tree whose ``__version__`` carries the stamp (:func:`stage_wheel_source`), and writes the
same stamp into the code dataset (:data:`STAMP_FILE`). A kernel prints both and stops when they
differ (:func:`cellmask.kaggle.session.check_code_version`): the wheel it installed and the
configs it reads then come from different checkouts.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STAMP_FILE = "cellmask-build.json"
"""The stamp of the code dataset, at its root (``{"version", "commit", "dirty", "digest"}``)."""
STAMPED_PARTS = ("src", "configs", "pyproject.toml")
"""What decides the code a kernel runs (docs and notebooks change nothing the wheel does)."""
WHEEL_PARTS = ("pyproject.toml", "README.md", "src")
"""What ``pip wheel`` needs of the checkout (the README is the package's long description)."""
_IGNORED = ("__pycache__", "*.pyc", "*.egg-info", ".ipynb_checkpoints")
_VERSION_LINE = re.compile(r'^__version__ = "([^"]*)"$', re.M)


@dataclass(frozen=True)
class BuildStamp:
    """The checkout a build comes from.

    Attributes:
        base: cellmask's own version (``__version__`` of the checkout, e.g. ``0.1.0``).
        commit: the abbreviated commit, or ``nogit`` outside a git checkout.
        dirty: the :data:`STAMPED_PARTS` differ from ``commit`` (always true outside git).
        digest: the first 10 hex digits of the SHA-256 of the :data:`STAMPED_PARTS` files.
    """

    base: str
    commit: str
    dirty: bool
    digest: str

    @property
    def version(self) -> str:
        """``<base>+g<commit>``, plus ``.dirty.<digest>`` when dirty (a PEP 440 local version)."""
        local = f"g{self.commit}" + (f".dirty.{self.digest}" if self.dirty else "")
        return f"{self.base}+{local}"

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, **asdict(self)}


def _files(root: Path, parts: tuple[str, ...]) -> list[Path]:
    out = []
    for part in parts:
        path = root / part
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += [
                p
                for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and not p.suffix == ".pyc"
                and not any(q.endswith(".egg-info") for q in p.parts)
            ]  # fmt: skip
    return sorted(out)


def source_digest(root: str | Path = ".") -> str:
    """SHA-256 (10 hex digits) over the relative paths and bytes of :data:`STAMPED_PARTS`."""
    root = Path(root)
    h = hashlib.sha256()
    for path in _files(root, STAMPED_PARTS):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:10]


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def base_version(root: str | Path = ".") -> str:
    """``__version__`` of the checkout's ``src/cellmask/__init__.py`` (without a local label).

    Raises:
        ValueError: the file has no ``__version__ = "..."`` line.
    """
    init = Path(root) / "src" / "cellmask" / "__init__.py"
    match = _VERSION_LINE.search(init.read_text())
    if match is None:
        raise ValueError(f'{init}: no __version__ = "..." line')
    return match.group(1).split("+", 1)[0]


def build_stamp(root: str | Path = ".") -> BuildStamp:
    """The stamp of the checkout at ``root`` as it is now (working tree, not only the commit)."""
    root = Path(root)
    commit = _git(root, "rev-parse", "--short=7", "HEAD")
    status = _git(root, "status", "--porcelain", "--", *STAMPED_PARTS) if commit else None
    return BuildStamp(
        base=base_version(root),
        commit=commit or "nogit",
        dirty=commit is None or bool(status),
        digest=source_digest(root),
    )


def set_version(init_py: str | Path, version: str) -> Path:
    """Rewrite the ``__version__ = "..."`` line of ``init_py`` to ``version``.

    Raises:
        ValueError: the file has no such line.
    """
    init_py = Path(init_py)
    text = init_py.read_text()
    if _VERSION_LINE.search(text) is None:
        raise ValueError(f'{init_py}: no __version__ = "..." line')
    init_py.write_text(_VERSION_LINE.sub(f'__version__ = "{version}"', text, count=1))
    return init_py


def stage_wheel_source(root: str | Path, stamp: BuildStamp, dest: str | Path) -> Path:
    """Copy :data:`WHEEL_PARTS` of the checkout at ``root`` into ``dest`` (emptied first) with
    ``__version__`` set to ``stamp.version``; ``pip wheel dest`` then builds the stamped wheel
    (the package's version is read from ``__version__``) without touching the checkout."""
    root, dest = Path(root), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for part in WHEEL_PARTS:
        src = root / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns(*_IGNORED))
        elif src.is_file():
            shutil.copy2(src, dest / part)
        else:
            raise FileNotFoundError(f"{src}: missing from the checkout")
    set_version(dest / "src" / "cellmask" / "__init__.py", stamp.version)
    return dest


def write_stamp(folder: str | Path, stamp: BuildStamp) -> Path:
    """``<folder>/cellmask-build.json`` with the stamp (and the version inside ``folder``'s
    ``src/cellmask/__init__.py`` when it has one, so both say the same)."""
    folder = Path(folder)
    init = folder / "src" / "cellmask" / "__init__.py"
    if init.is_file():
        set_version(init, stamp.version)
    path = folder / STAMP_FILE
    path.write_text(json.dumps(stamp.to_json(), indent=2) + "\n")
    return path


def read_stamp(folder: str | Path) -> dict[str, Any] | None:
    """The stamp a folder (a code dataset) carries, or ``None`` when it has none."""
    path = Path(folder) / STAMP_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def wheel_version(wheel: str | Path) -> str:
    """The version in a wheel's file name (``cellmask-0.1.0+gabc1234-py3-none-any.whl``).

    Raises:
        ValueError: not a wheel file name.
    """
    parts = Path(wheel).name.split("-")
    if len(parts) < 5 or not parts[-1].endswith(".whl"):
        raise ValueError(f"{wheel}: not a wheel file name")
    return parts[1]
