"""What gets pushed to Kaggle: kernel folders, the three datasets, the weights and the wheels.

Kernels. ``kernel-metadata.json`` at the repo root describes the offline inference kernel
(``notebooks/07_inference.ipynb``: internet off, GPU on, the competition and our three datasets
attached) with the placeholder user ``USER``. Every other notebook can be pushed as a training
kernel (internet on, GPU on except ``00_prepare_data``): its metadata is the same template with
the fields of :func:`kernel_spec` changed. :func:`stage_kernel` writes one folder
``build/kaggle/kernels/<slug>/`` holding the filled metadata and the notebook, with parameter
values injected where the kernel needs them (``01_pretrain_livecell`` is pushed once per
branch), and ``kaggle kernels push -p`` uploads that folder.

Datasets. ``datasets/<name>/dataset-metadata.json`` is committed (id ``USER/<name>``); the
files beside it are build outputs: ``cellmask-weights`` (each run's ``best.pt`` and resolved
``config.yaml``, and the tuned predict config: :mod:`cellmask.kaggle.weights`),
``cellmask-wheels`` (every dependency Kaggle's image lacks, as wheels, plus cellmask's own;
``base_image.json`` there says what the image is assumed to have: :mod:`cellmask.kaggle.wheels`)
and ``cellmask-code`` (:func:`build_code_dataset`: configs, sources and notebooks).
:func:`stage_dataset` hard-links them into ``build/kaggle/datasets/<name>/`` with the user filled
in, so the committed metadata never changes.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cellmask.errors import DataError
from cellmask.kaggle.notebooks import (
    inject_parameters,
    notebook_parameters,
    read_notebook_json,
    write_notebook_json,
)

USER = "USER"
"""Placeholder user of the committed metadata, replaced at push time."""
KERNEL_METADATA = "kernel-metadata.json"
DATASET_METADATA = "dataset-metadata.json"
NOTEBOOK_DIR = "notebooks"
DATASETS_DIR = "datasets"
BUILD_DIR = Path("build") / "kaggle"
WEIGHTS, WHEELS, CODE = "cellmask-weights", "cellmask-wheels", "cellmask-code"
DATASET_NAMES = (WEIGHTS, WHEELS, CODE)
INFERENCE_NOTEBOOK = "07_inference"
PRETRAIN_NOTEBOOK = "01_pretrain_livecell"
EVALUATE_NOTEBOOK = "08_evaluate"
BASE_IMAGE = Path(DATASETS_DIR) / WHEELS / "base_image.json"
CODE_PARTS = ("configs", "src", "notebooks", "pyproject.toml", "README.md")
"""What the code dataset holds (configs are read from it on Kaggle)."""


def slugify(title: str) -> str:
    """Kaggle's slug of a title: lower case, each run of other characters one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def fill_user(value: Any, user: str) -> Any:
    """``value`` with every string ``USER/...`` (ids and sources) changed to ``<user>/...``."""
    if isinstance(value, str):
        return user + value[len(USER) :] if value.startswith(USER + "/") else value
    if isinstance(value, list):
        return [fill_user(v, user) for v in value]
    if isinstance(value, dict):
        return {k: fill_user(v, user) for k, v in value.items()}
    return value


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path`` (clear errors for a missing or malformed file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# kernels


@dataclass(frozen=True)
class KernelSpec:
    """How one notebook runs as a Kaggle kernel.

    Attributes:
        notebook: file stem under ``notebooks/`` (``02_finetune_faster_rcnn_swin_t``).
        slug: the kernel's slug (its title is the slug with spaces).
        enable_gpu, enable_internet: the kernel's settings (the inference kernel: internet off).
        datasets: our dataset names it attaches (``USER/<name>`` once filled).
        kernels: slugs of our kernels whose output it reads (mounted under ``/kaggle/input``).
        parameters: values injected into the notebook's parameters cell when pushed.
        sources: more kernel sources as given (``owner/slug/N``: a continuation's previous
            version, :func:`with_run_options`).
    """

    notebook: str
    slug: str
    enable_gpu: bool = True
    enable_internet: bool = True
    datasets: tuple[str, ...] = (WHEELS, CODE)
    kernels: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        return self.slug.replace("-", " ")


def pretrain_slug(branch: str) -> str:
    """Slug of the LIVECell pretraining kernel of one branch config (``faster_rcnn_swin_t``)."""
    return slugify(f"cellmask pretrain {branch}")


def list_notebooks(root: str | Path = ".") -> list[str]:
    """Stems of the numbered notebooks under ``root/notebooks``, in order."""
    return sorted(p.stem for p in (Path(root) / NOTEBOOK_DIR).glob("[0-9][0-9]_*.ipynb"))


def kernel_spec(notebook: str, branch: str | None = None, root: str | Path = ".") -> KernelSpec:
    """The :class:`KernelSpec` of ``notebook`` (a stem of :func:`list_notebooks`).

    ``branch`` (a config name under ``configs/``) only applies to ``01_pretrain_livecell``: its
    kernel then pretrains that one branch, under its own slug (so each branch's output stays).

    Raises:
        ValueError: an unknown notebook, a ``branch`` for another notebook, or an unknown branch.
    """
    root = Path(root)
    known = list_notebooks(root)
    if notebook not in known:
        raise ValueError(f"unknown notebook {notebook!r}; known: {', '.join(known)}")
    stage = notebook.split("_", 1)[1]
    if branch is not None:
        if stage != "pretrain_livecell":
            raise ValueError(f"a branch only applies to 01_pretrain_livecell, not {notebook}")
        if not (root / "configs" / f"{branch}.yaml").is_file():
            raise ValueError(f"unknown branch {branch!r}: no configs/{branch}.yaml")
        return KernelSpec(notebook, pretrain_slug(branch), parameters={"BRANCHES": [branch]})
    if notebook == INFERENCE_NOTEBOOK:
        template = read_json(root / KERNEL_METADATA)
        return KernelSpec(
            notebook,
            template["id"].split("/", 1)[1],
            enable_gpu=bool(template["enable_gpu"]),
            enable_internet=bool(template["enable_internet"]),
            datasets=tuple(s.split("/", 1)[1] for s in template["dataset_sources"]),
        )
    slug = slugify(f"cellmask {stage}")
    if stage == "prepare_data":
        return KernelSpec(notebook, slug, enable_gpu=False)
    if stage.startswith("finetune_") or stage == "soft_teacher":  # reads its branch's LIVECell run
        params = notebook_parameters(read_notebook_json(root / NOTEBOOK_DIR / f"{notebook}.ipynb"))
        return KernelSpec(notebook, slug, kernels=(pretrain_slug(params["BRANCH"]),))
    if stage == "evaluate":
        return KernelSpec(notebook, slug, datasets=DATASET_NAMES)
    return KernelSpec(notebook, slug)


def with_run_options(
    spec: KernelSpec,
    epochs: int | None = None,
    resume_from: str | None = None,
    overrides: Sequence[str] = (),
    extend: bool = False,
) -> KernelSpec:
    """``spec`` with a training run's options (``make push-train EPOCHS=.. RESUME_FROM=..
    OVERRIDES=..``) as the notebook's ``EPOCHS``, ``OVERRIDES`` and ``RESUME_FROM`` parameters.

    ``resume_from`` names one version of a kernel, ``owner/slug/N`` (normally an earlier version
    of this one): it is attached pinned to that version (``kernel_sources``), so its output,
    ``last.pt`` included, is mounted, and the notebook continues that run from its next step
    (:func:`cellmask.data.inputs.resume_run`).

    ``extend`` (``EXTEND``) lets a continuation lengthen the run's schedule (``EPOCHS`` above its
    own); without it, a continuation's ``EPOCHS`` must be the run's (or unset).

    Raises:
        ValueError: ``epochs`` < 1, an override that is not ``KEY.PATH=VALUE``, a
            ``resume_from`` that is not ``owner/slug/N``, or ``extend`` without ``resume_from``
            and ``epochs``.
    """
    from cellmask.config import parse_overrides
    from cellmask.data.inputs import parse_kernel_ref

    params, sources = dict(spec.parameters), list(spec.sources)
    if epochs is not None:
        if int(epochs) < 1:
            raise ValueError(f"EPOCHS must be >= 1, got {epochs}")
        params["EPOCHS"] = int(epochs)
    if overrides:
        parse_overrides(overrides)  # a malformed one fails here, not hours later on Kaggle
        params["OVERRIDES"] = list(overrides)
    if resume_from:
        ref = parse_kernel_ref(resume_from)
        if ref is None or ref[2] is None:
            raise ValueError(
                f"RESUME_FROM={resume_from!r}: name the kernel version to continue as owner/slug/N "
                "(the version whose output holds last.pt; kaggle kernels list --mine shows the slugs)"
            )
        params["RESUME_FROM"] = resume_from
        sources.append(resume_from)
    if extend:
        if not (resume_from and epochs is not None):
            raise ValueError("EXTEND lengthens a continued run: give RESUME_FROM and EPOCHS with it")
        params["EXTEND"] = True
    return replace(spec, parameters=params, sources=tuple(dict.fromkeys(sources)))


def writes_competition_runs(spec: KernelSpec) -> bool:
    """Whether the kernel trains on the competition images (its output holds ``sartorius/<run>/``):
    the fine-tuning notebooks, Soft Teacher and the segmenter."""
    stage = spec.notebook.split("_", 1)[1]
    return stage.startswith("finetune_") or stage in ("soft_teacher", "segmenter")


def kernel_metadata(
    spec: KernelSpec, user: str, root: str | Path = ".", code_file: str | None = None
) -> dict:
    """``kernel-metadata.json`` of ``spec`` for ``user``: the committed template with the
    kernel's own id, title, code file, settings and sources."""
    meta = read_json(Path(root) / KERNEL_METADATA)
    meta.update(
        id=f"{USER}/{spec.slug}",
        title=spec.title,
        code_file=code_file or f"{NOTEBOOK_DIR}/{spec.notebook}.ipynb",
        enable_gpu=spec.enable_gpu,
        enable_internet=spec.enable_internet,
        dataset_sources=[f"{USER}/{name}" for name in spec.datasets],
        kernel_sources=[f"{USER}/{slug}" for slug in spec.kernels] + list(spec.sources),
    )
    return fill_user(meta, user)


def stage_kernel(
    spec: KernelSpec, user: str, root: str | Path = ".", build: str | Path | None = None
) -> Path:
    """Write ``build/kernels/<slug>/`` (metadata + notebook) for ``kaggle kernels push -p``.

    The notebook is copied as committed, or with :attr:`KernelSpec.parameters` injected.
    """
    root = Path(root)
    folder = Path(build if build is not None else root / BUILD_DIR) / "kernels" / spec.slug
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    source = root / NOTEBOOK_DIR / f"{spec.notebook}.ipynb"
    target = folder / source.name
    if spec.parameters:
        nb = inject_parameters(read_notebook_json(source), spec.parameters)
        write_notebook_json(nb, target)
    else:
        shutil.copyfile(source, target)
    write_json(folder / KERNEL_METADATA, kernel_metadata(spec, user, root, code_file=target.name))
    return folder


# --------------------------------------------------------------------------------------------
# datasets


def dataset_metadata(name: str, user: str, root: str | Path = ".") -> dict:
    """The committed ``datasets/<name>/dataset-metadata.json`` with ``user`` filled in."""
    return fill_user(read_json(Path(root) / DATASETS_DIR / name / DATASET_METADATA), user)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.hardlink_to(src)  # no copy of gigabytes of weights
    except OSError:
        shutil.copy2(src, dst)


def stage_dataset(name: str, user: str, root: str | Path = ".", build: str | Path | None = None) -> Path:
    """``build/datasets/<name>/``: the files of ``datasets/<name>/`` (hard links where the file
    system allows) and the metadata with ``user`` filled in.

    Raises:
        DataError: the dataset folder holds nothing besides its metadata (the message says which
            make target fills it).
    """
    root = Path(root)
    source = root / DATASETS_DIR / name
    meta = dataset_metadata(name, user, root)
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name != DATASET_METADATA)
    if not files or (name == WHEELS and not any(p.suffix == ".whl" for p in files)):
        target = {WEIGHTS: "make weights", WHEELS: "make wheels", CODE: "make code-dataset"}.get(name, "")
        raise DataError(f"{source}: nothing to upload yet; run `{target}` first")
    folder = Path(build if build is not None else root / BUILD_DIR) / "datasets" / name
    if folder.exists():
        shutil.rmtree(folder)
    for path in files:
        _link_or_copy(path, folder / path.relative_to(source))
    write_json(folder / DATASET_METADATA, meta)
    return folder


def build_code_dataset(root: str | Path = ".", out: str | Path | None = None, stamp: Any = None) -> Path:
    """Copy :data:`CODE_PARTS` of the checkout into ``datasets/cellmask-code/`` (caches left out),
    with the checkout's build stamp (:mod:`cellmask.kaggle.stamp`; ``stamp`` or the one of now)
    in ``cellmask-build.json`` and in its ``__version__``."""
    from cellmask.kaggle.stamp import build_stamp, write_stamp

    root = Path(root)
    stamp = stamp or build_stamp(root)
    out = Path(out) if out is not None else root / DATASETS_DIR / CODE
    out.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".ipynb_checkpoints")
    for part in CODE_PARTS:
        src, dst = root / part, out / part
        if dst.is_dir():
            shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dst)
        else:
            raise FileNotFoundError(f"{src}: missing from the checkout")
    write_stamp(out, stamp)
    return out
