"""Find what a kernel reads under Kaggle's input folder, in either layout Kaggle mounts it.

Older notebooks see every input one level down (``/kaggle/input/<slug>/``); newer ones see
``/kaggle/input/competitions/<competition>/``, ``/kaggle/input/datasets/<owner>/<slug>/`` and
``/kaggle/input/notebooks/<owner>/<slug>/`` (other kernels' outputs). Rather than spell paths,
each input is recognised by its marker files (:class:`Wanted`): the competition data by
``train.csv`` + ``test/``, the wheels by a ``cellmask-*.whl``, the code dataset by ``configs/`` +
``src/cellmask``, the weights dataset by ``manifest.json``, a training run by ``best.pt`` +
``config.yaml``. The search is bounded (:data:`MAX_DEPTH` levels below the input root), skips
image folders (:data:`PRUNED`) and never descends into a folder that holds a marker, so the
competition's thousands of images are never listed.

Pure :mod:`pathlib`: nothing here imports torch or cellmask's models, so the notebooks can use
it before anything heavy is loaded. :func:`default_data_root` is the data root every command
defaults to (``$CELLMASK_DATA``, the competition's folder on Kaggle, or ``data/synthetic``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cellmask.paths import DATA_ENV, KAGGLE_INPUT, LOCAL_DEFAULT_ROOT

MAX_DEPTH = 5
"""How many folder levels below the input root are searched (``notebooks/<owner>/<slug>/
livecell/<branch>`` is 5)."""
PRUNED = frozenset({"train", "test", "train_semi_supervised", "images", "__pycache__", ".git"})
"""Folder names never descended into (the competition's and LIVECell's image folders)."""
NEW_LAYOUT = {"competitions": 1, "datasets": 2, "notebooks": 2}
"""The new layout's top folders and how many levels below each an input's own folder is
(``competitions/<competition>``, ``datasets/<owner>/<slug>``, ``notebooks/<owner>/<slug>``)."""
LISTED_PER_FOLDER = 12
"""How many entries of each folder :func:`describe_inputs` lists before ``... and N more``."""


class InputNotFound(FileNotFoundError):
    """An input a kernel needs is not under the input root (the message says what was looked
    for, where, and what the root holds)."""


@dataclass(frozen=True)
class Wanted:
    """One kind of input: what it is, how it is recognised, and how to attach it.

    Attributes:
        what: its name in messages (``competition data``: "no competition data: ...").
        markers: the marker files, as messages show them (``train.csv + test/``).
        matches: whether a folder is one (holds the markers).
        preferred: the folder name preferred when several folders match.
        hint: how to make it appear.
    """

    what: str
    markers: str
    matches: Callable[[Path], bool]
    preferred: str
    hint: str


def is_competition_root(folder: Path) -> bool:
    """Whether ``folder`` holds ``train.csv`` and ``test/`` (the competition's data)."""
    return (folder / "train.csv").is_file() and (folder / "test").is_dir()


def is_wheels_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a cellmask wheel (``cellmask-*.whl``)."""
    return any(folder.glob("cellmask-*.whl"))


def is_code_dataset(folder: Path) -> bool:
    """Whether ``folder`` holds ``configs/`` and ``src/cellmask`` (the cellmask-code dataset)."""
    return (folder / "configs").is_dir() and (folder / "src" / "cellmask").is_dir()


def is_weights_dataset(folder: Path) -> bool:
    """Whether ``folder`` holds ``manifest.json`` (the cellmask-weights dataset)."""
    return (folder / "manifest.json").is_file()


def is_run(folder: Path) -> bool:
    """Whether ``folder`` holds ``best.pt`` and ``config.yaml`` (a ``cellmask train`` run)."""
    return (folder / "best.pt").is_file() and (folder / "config.yaml").is_file()


COMPETITION_INPUT = Wanted(
    "competition data",
    "train.csv + test/",
    is_competition_root,
    "sartorius-cell-instance-segmentation",
    "attach the competition's data to the kernel (or set DATA)",
)
WHEELS_INPUT = Wanted(
    "wheels dataset",
    "cellmask-*.whl",
    is_wheels_folder,
    "cellmask-wheels",
    "attach the cellmask-wheels dataset (make wheels; make push-datasets) or set WHEELS",
)
CODE_INPUT = Wanted(
    "code dataset",
    "configs/ + src/cellmask",
    is_code_dataset,
    "cellmask-code",
    "attach the cellmask-code dataset (make push-datasets) or set CONFIGS",
)
WEIGHTS_INPUT = Wanted(
    "weights dataset",
    "manifest.json",
    is_weights_dataset,
    "cellmask-weights",
    "attach the cellmask-weights dataset (make weights; make push-datasets) or set WEIGHTS",
)
MARKED = (is_competition_root, is_wheels_folder, is_code_dataset, is_weights_dataset, is_run)
"""Folders holding any of these markers are inputs of their own: the search stops there."""


def _subfolders(folder: Path) -> list[Path]:
    """The folders right under ``folder``, sorted (none when it cannot be listed)."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return []


def walk_inputs(input_root: Path = KAGGLE_INPUT, max_depth: int = MAX_DEPTH) -> Iterator[Path]:
    """Every folder at most ``max_depth`` levels below ``input_root``, shallowest first.

    Folders named in :data:`PRUNED` are skipped, and a folder holding any marker of
    :data:`MARKED` is yielded but not descended into.
    """
    level = [input_root]
    for _ in range(max_depth):
        below = []
        for folder in level:
            for sub in _subfolders(folder):
                if sub.name in PRUNED:
                    continue
                yield sub
                if not any(marked(sub) for marked in MARKED):
                    below.append(sub)
        level = below


def find_all(wanted: Wanted, input_root: Path = KAGGLE_INPUT, max_depth: int = MAX_DEPTH) -> list[Path]:
    """The folders under ``input_root`` that are ``wanted``, the preferred name first, then
    shallowest first."""
    found = [p for p in walk_inputs(input_root, max_depth) if wanted.matches(p)]
    return sorted(found, key=lambda p: p.name != wanted.preferred)  # stable: depth order stays


def find(wanted: Wanted, input_root: Path = KAGGLE_INPUT) -> Path | None:
    """The folder under ``input_root`` that is ``wanted`` (see :func:`find_all`), or ``None``."""
    return next(iter(find_all(wanted, input_root)), None)


def describe_inputs(input_root: Path = KAGGLE_INPUT, depth: int = 2) -> str:
    """What ``input_root`` holds, ``depth`` levels deep, one indented line per entry (at most
    :data:`LISTED_PER_FOLDER` per folder)."""
    if not input_root.is_dir():
        return f"{input_root} does not exist"
    return "\n".join([f"{input_root} holds:", *_listing(input_root, depth, "  ")])


def _listing(folder: Path, depth: int, indent: str) -> list[str]:
    """The lines of :func:`describe_inputs` for ``folder``'s entries."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        return [f"{indent}(cannot list: {exc.strerror})"]
    if not entries:
        return [f"{indent}(empty)"]
    lines = []
    for entry in entries[:LISTED_PER_FOLDER]:
        lines.append(f"{indent}{entry.name}{'/' if entry.is_dir() else ''}")
        if entry.is_dir() and depth > 1:
            lines += _listing(entry, depth - 1, indent + "  ")
    if len(entries) > LISTED_PER_FOLDER:
        lines.append(f"{indent}... and {len(entries) - LISTED_PER_FOLDER} more")
    return lines


def layouts(input_root: Path = KAGGLE_INPUT) -> str:
    """The two layouts searched, as messages name them."""
    return (
        f"the old layout ({input_root}/<slug>/) and the new one ({input_root}/competitions/<competition>/, "
        f"{input_root}/datasets/<owner>/<slug>/, {input_root}/notebooks/<owner>/<slug>/)"
    )


def not_found(what: str, markers: str, hint: str, input_root: Path = KAGGLE_INPUT) -> InputNotFound:
    """The error for a missing input: what was looked for, where, how to fix it, and what
    ``input_root`` holds."""
    return InputNotFound(
        f"no {what}: looked for a folder holding {markers}, up to {MAX_DEPTH} levels below "
        f"{input_root}, in {layouts(input_root)}; {hint}.\n{describe_inputs(input_root)}"
    )


def require(wanted: Wanted, input_root: Path = KAGGLE_INPUT) -> Path:
    """The folder under ``input_root`` that is ``wanted``.

    Raises:
        InputNotFound: none is (the message lists the markers, the layouts and the root).
    """
    found = find(wanted, input_root)
    if found is None:
        raise not_found(wanted.what, wanted.markers, wanted.hint, input_root)
    return found


def competition_root(input_root: Path = KAGGLE_INPUT) -> Path:
    """The competition's data folder (``train.csv`` + ``test/``; :func:`require`)."""
    return require(COMPETITION_INPUT, input_root)


def wheels_folder(input_root: Path = KAGGLE_INPUT) -> Path:
    """The wheels dataset's folder (a ``cellmask-*.whl``; :func:`require`)."""
    return require(WHEELS_INPUT, input_root)


def code_dataset(input_root: Path = KAGGLE_INPUT) -> Path:
    """The code dataset's folder (``configs/`` + ``src/cellmask``; :func:`require`)."""
    return require(CODE_INPUT, input_root)


def weights_dataset(input_root: Path = KAGGLE_INPUT) -> Path:
    """The weights dataset's folder (``manifest.json``; :func:`require`)."""
    return require(WEIGHTS_INPUT, input_root)


def input_mounts(input_root: Path = KAGGLE_INPUT) -> list[Path]:
    """The folder of every mounted input in both layouts: ``<root>/<slug>`` (old) and
    ``<root>/competitions/<competition>``, ``<root>/datasets/<owner>/<slug>``,
    ``<root>/notebooks/<owner>/<slug>`` (new)."""
    mounts = []
    for top in _subfolders(input_root):
        levels = NEW_LAYOUT.get(top.name)
        if levels is None:
            mounts.append(top)
            continue
        level = [top]
        for _ in range(levels):
            level = [sub for folder in level for sub in _subfolders(folder)]
        mounts += level
    return mounts


def find_relative(
    relative: str | Path, roots: Sequence[str | Path] = (), input_root: Path = KAGGLE_INPUT
) -> Path | None:
    """The first ``<root>/<relative>`` that exists, trying ``roots`` and then every input of
    :func:`input_mounts`; ``None`` if none does."""
    candidates = [Path(r) / relative for r in roots]
    candidates += [mount / relative for mount in input_mounts(input_root)]
    return next((c for c in candidates if c.exists()), None)


def find_run(
    dataset: str, name: str, roots: Sequence[str | Path] = (), input_root: Path = KAGGLE_INPUT
) -> Path | None:
    """The run directory ``<dataset>/<name>`` (``livecell/faster_rcnn_swin_t``) holding
    ``best.pt`` + ``config.yaml``: ``<root>/<dataset>/<name>`` for the first of ``roots`` that
    has it, else the shallowest such folder under ``input_root`` (any kernel output, either
    layout, up to :data:`MAX_DEPTH` levels); ``None`` if there is none."""
    for root in roots:
        if is_run(Path(root) / dataset / name):
            return Path(root) / dataset / name
    return next(
        (p for p in walk_inputs(input_root) if p.name == name and p.parent.name == dataset and is_run(p)),
        None,
    )


KERNEL_REF = re.compile(r"(?P<owner>[A-Za-z0-9_-]+)/(?P<slug>[A-Za-z0-9-]+)(?:/(?P<version>\d+))?")
"""A kernel as ``kernel_sources`` names it: ``owner/slug``, or one version ``owner/slug/N``."""


def parse_kernel_ref(ref: str) -> tuple[str, str, int | None] | None:
    """``(owner, slug, version or None)`` of a kernel reference, ``None`` if ``ref`` is not one."""
    match = KERNEL_REF.fullmatch(str(ref).strip())
    if match is None:
        return None
    version = match.group("version")
    return match.group("owner"), match.group("slug"), int(version) if version else None


def kernel_output(ref: str, input_root: Path = KAGGLE_INPUT) -> Path:
    """Where the output of kernel ``ref`` (``owner/slug[/N]``, attached as a kernel source) is
    mounted: ``<root>/notebooks/<owner>/<slug>`` (new layout) or ``<root>/<slug>`` (old).

    Raises:
        ValueError: ``ref`` is not ``owner/slug[/N]``.
        InputNotFound: it is not mounted (the message lists what the input root holds).
    """
    parsed = parse_kernel_ref(ref)
    if parsed is None:
        raise ValueError(f"{ref!r} is not a kernel reference owner/slug[/version]")
    owner, slug, _ = parsed
    for folder in (input_root / "notebooks" / owner / slug, input_root / slug):
        if folder.is_dir():
            return folder
    raise not_found(
        f"output of kernel {ref}",
        f"its output folder ({input_root}/notebooks/{owner}/{slug}/ or {input_root}/{slug}/)",
        f"attach it to this kernel as a kernel source ({owner}/{slug}, pinned to the version wanted)",
        input_root,
    )


def resume_run(resume_from: str | Path, dataset: str, name: str, input_root: Path = KAGGLE_INPUT) -> Path:
    """The run directory to continue, from what a notebook's ``RESUME_FROM`` says: a run
    directory holding ``last.pt``; a folder holding ``<dataset>/<name>/last.pt`` (an earlier
    kernel version's output, as mounted); or a kernel reference ``owner/slug[/N]`` whose output
    is mounted under ``input_root`` (:func:`kernel_output`).

    Raises:
        InputNotFound: no ``last.pt`` there (the message names every place looked at).
    """
    path = Path(resume_from)
    if not path.exists() and parse_kernel_ref(str(resume_from)) is not None:
        path = kernel_output(str(resume_from), input_root)
    candidates = [path, path / dataset / name]
    for candidate in candidates:
        if (candidate / "last.pt").is_file():
            return candidate
    raise not_found(
        f"run to resume from {resume_from}",
        "last.pt at " + " or ".join(str(c) for c in candidates),
        "RESUME_FROM names a run directory, an earlier version's output folder, or that kernel "
        "(owner/slug/version, attached as a kernel source)",
        input_root,
    )


def default_data_root(input_root: Path = KAGGLE_INPUT) -> Path:
    """``$CELLMASK_DATA`` if set, else (on Kaggle: ``input_root`` exists) the competition's
    folder found under it in either input layout, else ``data/synthetic``.

    Raises:
        InputNotFound: on Kaggle, no competition data is attached (the
            message lists what was looked for and what the input folder holds).
    """
    if env := os.environ.get(DATA_ENV):
        return Path(env)
    if input_root.is_dir():
        return competition_root(input_root)
    return LOCAL_DEFAULT_ROOT
