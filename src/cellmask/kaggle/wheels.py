"""The wheels dataset: every dependency of cellmask that Kaggle's image lacks, as wheels for its
Python and platform, plus cellmask's own wheel (``make wheels``). ``base_image.json`` beside
the wheels says what the image is assumed to have; the kernels install cellmask from the
wheels with ``pip install --no-index --find-links <wheels> cellmask`` (pip resolves every
dependency against the image and the folder, so a missing one fails the install, not a later
import)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cellmask.errors import DataError
from cellmask.kaggle.packaging import BASE_IMAGE, read_json


def normalize_name(name: str) -> str:
    """PEP 503 normalised distribution name (``Segmentation_Models.PyTorch`` -> ``segmentation-models-pytorch``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_base_image(path: str | Path = BASE_IMAGE) -> dict[str, Any]:
    """``base_image.json``: ``python`` (``3.11``), ``platforms`` (pip ``--platform`` tags) and
    ``provided`` (distribution -> the top-level modules it gives), what Kaggle's image has."""
    data = read_json(path)
    for key in ("python", "platforms", "provided"):
        if key not in data:
            raise DataError(f"{path}: missing {key!r}")
    return data


def _requirement(text: str, python: str) -> str | None:
    """The distribution a ``Requires-Dist`` line needs on Linux with ``python``, else ``None``."""
    from packaging.requirements import Requirement

    req = Requirement(text)
    if req.marker is not None:
        env = {"python_version": python, "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
        env |= {"platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython"}
        if not req.marker.evaluate(env):
            return None
    return normalize_name(req.name)


def _installed_requires(name: str) -> list[str]:
    """``Requires-Dist`` lines of an installed distribution (``[]`` when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return requires(name) or []
    except PackageNotFoundError:
        return []


def requirement_closure(
    roots: Iterable[str],
    python: str,
    requires: Callable[[str], Iterable[str] | None] | None = None,
    stop: Iterable[str] = (),
) -> set[str]:
    """Normalised names of ``roots`` and of every distribution they require, recursively, on
    Linux with ``python`` (markers evaluated, extras left out). The walk includes the names in
    ``stop`` but does not go past them.

    Args:
        requires: ``name -> Requires-Dist lines`` (default: the installed metadata; a
            distribution that is not installed has none).
    """
    requires = requires or _installed_requires
    halt = {normalize_name(n) for n in stop}
    seen = {normalize_name(r) for r in roots}
    todo = sorted(seen - halt)
    while todo:
        name = todo.pop()
        for line in requires(name) or []:
            dep = _requirement(line, python)
            if dep and dep not in seen:
                seen.add(dep)
                if dep not in halt:
                    todo.append(dep)
    return seen


def missing_distributions(
    base: Mapping[str, Any],
    root: str = "cellmask",
    requires: Callable[[str], Iterable[str] | None] | None = None,
) -> list[str]:
    """The distributions ``root`` needs (its dependencies, recursively, for Linux and
    ``base["python"]``) that ``base["provided"]`` does not: what the wheels dataset must hold.
    The walk stops at provided distributions (the image brings their dependencies too).

    Args:
        requires: ``name -> Requires-Dist lines`` (default: the installed metadata).
    """
    provided = {normalize_name(n) for n in base["provided"]}
    found = requirement_closure([root], str(base["python"]), requires, stop=provided)
    return sorted(found - provided - {normalize_name(root)})


def wheel_distributions(base: Mapping[str, Any], root: str = "cellmask") -> list[str]:
    """What ``make wheels`` puts in the wheels dataset: ``root``'s own wheel and
    :func:`missing_distributions` (normalised names)."""
    return [normalize_name(root), *missing_distributions(base, root)]


def pinned(names: Iterable[str], version: Callable[[str], str] | None = None) -> list[str]:
    """``name==version`` of the installed version (what the tests ran), or the bare name."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    version = version or installed_version
    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def own_wheel_command(out: str | Path, source: str | Path) -> list[str]:
    """``pip wheel`` of cellmask from ``source`` (a staged, stamped copy of the checkout:
    :func:`cellmask.kaggle.stamp.stage_wheel_source`) into ``out``."""
    return [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--wheel-dir",
        str(out),
        str(source),
    ]


def wheel_commands(
    out: str | Path, base: Mapping[str, Any], requirements: Sequence[str], source: str | Path = "."
) -> list[list[str]]:
    """The pip commands of ``make wheels``: download ``requirements`` as binary wheels for
    Kaggle's Python and platform (no dependencies: :func:`missing_distributions` chose them),
    then build cellmask's own wheel from ``source`` (:func:`own_wheel_command`), both into ``out``."""
    pip = [sys.executable, "-m", "pip"]
    download = [*pip, "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp"]
    download += ["--python-version", str(base["python"])]
    for platform in base["platforms"]:
        download += ["--platform", platform]
    download += ["--dest", str(out), *requirements]
    own = own_wheel_command(out, source)
    return [download, own] if requirements else [own]


def build_own_wheel(
    root: str | Path, out: str | Path, stamp: Any, run: Callable[..., Any] | None = None
) -> Path:
    """Rebuild cellmask's wheel in ``out`` from the working tree at ``root`` with ``stamp``'s
    version (the old ``cellmask-*.whl`` removed first: two would both be candidates for pip).

    Returns:
        the new wheel's path.

    Raises:
        DataError: the build wrote no wheel of ``stamp``'s version.
    """
    import subprocess

    from cellmask.kaggle.stamp import stage_wheel_source

    root, out = Path(root), Path(out)
    source = stage_wheel_source(root, stamp, root / "build" / "kaggle" / "wheel-src")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("cellmask-*.whl"):
        old.unlink()
    (run or subprocess.run)(own_wheel_command(out, source), check=True)
    built = sorted(out.glob(f"cellmask-{stamp.version}-*.whl"))
    if not built:
        raise DataError(f"{out}: pip wheel wrote no cellmask-{stamp.version}-*.whl")
    return built[0]
