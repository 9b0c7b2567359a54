"""What the notebooks share: where inputs and outputs are (Kaggle or a checkout), one training
stage, and the small tables and figures they show. Model code stays in the rest of cellmask.

On Kaggle the inputs are mounted under ``/kaggle/input`` in one of two layouts (``<slug>/``, or
``competitions/<competition>/``, ``datasets/<owner>/<slug>/`` and ``notebooks/<owner>/<slug>/``
for other kernels' outputs); :mod:`cellmask.data.inputs` finds each by its marker files. A
kernel writes to ``/kaggle/working``. From a checkout the same notebooks read ``data/synthetic``
(or ``$CELLMASK_DATA``) and ``configs/`` and write ``runs/``.
Runs are laid out as ``<out>/<dataset>/<config name>/`` (``livecell/faster_rcnn_swin_t``), so
a later notebook finds an earlier one's run in the same session or among the inputs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellmask.data.inputs import CODE_INPUT, default_data_root, find, find_run, not_found, resume_run
from cellmask.kaggle.views import (  # the notebooks' figures and tables, handed on
    default_device,
    detect_records,
    instance_table,
    plot_bars,
    plot_detections,
    segment_truth_boxes,
    validation_records,
)
from cellmask.paths import KAGGLE_INPUT, KAGGLE_WORKING, on_kaggle

__all__ = [
    "NotebookPaths",
    "check_code_version",
    "default_device",
    "detect_records",
    "instance_table",
    "livecell_init",
    "notebook_paths",
    "plot_bars",
    "plot_detections",
    "segment_truth_boxes",
    "stage_config",
    "train_stage",
    "validation_records",
]


def checkout_root(start: str | Path | None = None) -> Path | None:
    """The cellmask checkout holding ``start`` (default: the working directory), if any."""
    here = Path(start or Path.cwd()).resolve()
    for path in (here, *here.parents):
        if (path / "pyproject.toml").is_file() and (path / "src" / "cellmask").is_dir():
            return path
    return None


@dataclass(frozen=True)
class NotebookPaths:
    """The folders a notebook works with: ``data`` (Kaggle layout), ``out`` (runs and figures),
    ``configs`` (the YAML configs; ``None`` where none was found: :meth:`config` then says so)."""

    data: Path
    out: Path
    configs: Path | None

    def config(self, name: str) -> Path:
        """``configs/<name>.yaml``.

        Raises:
            FileNotFoundError: no configs folder, or no such config (the message lists the
                available ones).
        """
        if self.configs is None:
            raise FileNotFoundError(
                f"no configs folder: not in a checkout, and no {CODE_INPUT.what} (a folder holding "
                f"{CODE_INPUT.markers}) under {KAGGLE_INPUT}: attach the cellmask-code dataset or set CONFIGS"
            )
        path = self.configs / f"{name}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in self.configs.glob("*.yaml")))
            raise FileNotFoundError(f"{path}: no such config; available: {known}")
        return path

    def has_config(self, name: str) -> bool:
        """Whether ``configs/<name>.yaml`` exists."""
        return self.configs is not None and (self.configs / f"{name}.yaml").is_file()

    def run(self, dataset: str, name: str) -> Path:
        """Where the run of config ``name`` on ``dataset`` (``livecell`` / ``sartorius``) goes."""
        return self.out / dataset / name


def code_configs(input_root: Path = KAGGLE_INPUT) -> Path | None:
    """``configs/`` of the cellmask-code dataset found under ``input_root`` (either layout), if any."""
    code = find(CODE_INPUT, input_root)
    return code / "configs" if code is not None else None


def notebook_paths(
    data: str | Path | None = None,
    out: str | Path | None = None,
    configs: str | Path | None = None,
    *,
    input_root: Path = KAGGLE_INPUT,
) -> NotebookPaths:
    """Resolve a notebook's ``DATA`` / ``OUT`` / ``CONFIGS`` parameters (``None``: the default).

    Defaults: data :func:`cellmask.data.inputs.default_data_root` (the competition's folder under
    ``input_root`` on Kaggle; a relative default is taken from the checkout's root); out
    ``/kaggle/working`` on Kaggle, else ``runs/`` of the checkout; configs ``configs/`` of the
    checkout, else the cellmask-code dataset's (:func:`code_configs`). ``out`` is created.

    Raises:
        cellmask.data.inputs.InputNotFound: on Kaggle with ``data`` unset, no competition data
            under ``input_root``.
    """
    root = checkout_root()
    base = root or Path.cwd()
    data_path = Path(data) if data is not None else default_data_root(input_root)
    if not data_path.is_absolute() and data is None:
        data_path = base / data_path
    if out is None:
        out = KAGGLE_WORKING if on_kaggle() else base / "runs"
    if configs is None:
        configs = root / "configs" if root and (root / "configs").is_dir() else code_configs(input_root)
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    return NotebookPaths(data=data_path, out=out_path, configs=Path(configs) if configs is not None else None)


PRETRAINED_PROFILES = ("paper",)
"""The profiles whose fine-tuning must start from the branch's LIVECell run (the paper's recipe)."""


def livecell_init(
    branch: str,
    *,
    profile: str = "paper",
    init: str | Path | None = None,
    from_imagenet: bool = False,
    roots: Sequence[str | Path] = (),
    accept_unfinished: bool = False,
    input_root: Path = KAGGLE_INPUT,
) -> Path | None:
    """The checkpoint a fine-tuning stage of ``branch`` starts from (notebooks 02-05).

    ``init`` if given; ``None`` (the config's ImageNet backbone) if ``from_imagenet``; else the
    ``best.pt`` of the branch's LIVECell run ``livecell/<branch>`` (notebook 01) under ``roots``
    or any input (:func:`cellmask.data.inputs.find_run`). Without one, the ``paper`` profile
    stops (hours of GPU training from ImageNet weights would not be the paper's model); the
    other profiles (demo, smoke) go on from the config's backbone (``None``). A LIVECell run that
    did not finish (cut by a session's budget and never continued: its ``status.json``) is refused
    unless ``accept_unfinished``.

    Raises:
        ValueError: both ``init`` and ``from_imagenet``.
        RuntimeError: the LIVECell run found did not finish (and ``accept_unfinished`` is not set).
        cellmask.data.inputs.InputNotFound: profile ``paper``, no ``init``, ``from_imagenet``
            unset and no LIVECell run (the message says what was looked for and how to fix it).
    """
    if init is not None and from_imagenet:
        raise ValueError("INIT and FROM_IMAGENET both set: pick one")
    if init is not None:  # train_stage checks it (a resumed run does not need it)
        return Path(init)
    if from_imagenet:
        return None
    run = find_run("livecell", branch, roots, input_root)
    if run is not None:
        from cellmask.engine.status import read_status

        try:
            status = read_status(run)
        except FileNotFoundError:
            status = None
        if status is not None:
            print(f"LIVECell run {run}: {status.describe()}")
            if not status.finished and not accept_unfinished:
                raise RuntimeError(
                    f"{run}: the LIVECell run of {branch} did not finish ({status.describe()}): continue it "
                    f"(make push-train NB=01_pretrain_livecell BRANCH={branch} RESUME_FROM=<its last "
                    "version>), or set ACCEPT_UNFINISHED = True to fine-tune from it anyway"
                )
        return run / "best.pt"
    if profile not in PRETRAINED_PROFILES:
        return None
    where = "".join(f"{r}, " for r in roots)
    raise not_found(
        f"LIVECell run of {branch} (notebook 01)",
        f"best.pt + config.yaml at livecell/{branch}/ (under {where}or under any input)",
        f"attach the output of the 01 kernel of this branch (make push-train NB=01_pretrain_livecell "
        f"BRANCH={branch}), or set INIT to a checkpoint, or set FROM_IMAGENET = True to train from "
        "the ImageNet backbone on purpose",
        input_root,
    )


LIVECELL_RECIPE = ("train", "augment")
"""The sections the LIVECell stage of a Soft Teacher branch takes whole from ``base.yaml`` (same
profile): the supervised detectors' recipe, every field of it (AdamW, lr 1e-4, weight decay
1e-2, cosine, 36 epochs, batch 2, the paper's augmentations). Its own ``train:`` (SGD, lr 1e-3,
steps after epochs 8 and 11, groups of one labeled + one unlabeled image) is the Soft Teacher
stage's (paper 5.3; docs/PAPER.md)."""


def stage_config(
    paths: NotebookPaths, config: str, dataset: str, profile: str = "paper", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """The resolved config of one training stage: ``configs/<config>.yaml`` for ``profile`` with
    ``overrides``.

    A ``soft_teacher`` config on LIVECell is its plain Faster R-CNN (the paper's stage 1: there
    are no unlabeled LIVECell images): ``model.type: faster_rcnn``, no ``semi:`` section, and the
    :data:`LIVECELL_RECIPE` sections of ``base.yaml`` for the same profile, as every supervised
    branch is pretrained. The Soft Teacher stage then starts student and teacher from that run
    (``init``).
    """
    import copy

    from cellmask.config import deep_merge, load_config, parse_overrides

    cfg = load_config(paths.config(config), profile=profile)
    if dataset == "livecell" and cfg["model"]["type"] == "soft_teacher":
        base = load_config(paths.config("base"), profile=profile)
        cfg["model"]["type"] = "faster_rcnn"
        cfg.pop("semi", None)
        for section in LIVECELL_RECIPE:
            cfg[section] = copy.deepcopy(base[section])
        t = cfg["train"]
        print(
            f"{config} on LIVECell: its plain Faster R-CNN with the detectors' recipe (the paper's stage 1: "
            f"{t['optimizer']}, lr {t['lr']:g}, batch {t['batch_size']}, {t['scheduler']}, {t['epochs']} epochs)"
        )
    return deep_merge(cfg, parse_overrides(overrides)) if overrides else cfg


KAGGLE_SESSION_HOURS = 11.5
"""The training budget of one Kaggle GPU session (Kaggle ends a session after 12 hours; the half
hour left is for the notebook's last cells and for saving the output)."""
SESSION_RESERVE_MINUTES = 10.0
"""Room a Kaggle stage keeps before its deadline for the cut epoch's validation and save, until
the run has measured its own (``train.reserve_minutes``; it grows to the slowest measured)."""


def process_start_time() -> float:
    """When this process started, as ``time.time()`` (from ``/proc``: a notebook's kernel starts
    with the Kaggle session); the time of this call where ``/proc`` cannot tell."""
    import os

    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + int(stat[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


SESSION_START = process_start_time()
"""When the session started (``time.time()``): the start of the notebook's kernel process."""


def session_budget(
    cfg: Mapping[str, Any], kaggle: bool | None = None, now: float | None = None
) -> dict[str, float] | None:
    """The budget of a training stage on Kaggle whose config sets none: ``{"deadline": session
    start + KAGGLE_SESSION_HOURS, "reserve_minutes": SESSION_RESERVE_MINUTES}`` for the ``train``
    section (the clock runs from the session's start, so loading data, building the model and
    copying a run to resume are counted); ``None`` off Kaggle or when the config sets
    ``train.max_hours`` or ``train.deadline``.

    Args:
        now: ``time.time()`` of the call (tests), to report the hours left.
    """
    train = cfg.get("train") or {}
    if not (on_kaggle() if kaggle is None else kaggle) or train.get("max_hours") or train.get("deadline"):
        return None
    deadline = SESSION_START + KAGGLE_SESSION_HOURS * 3600.0
    left = (deadline - (time.time() if now is None else now)) / 3600.0
    reserve = max(float(train.get("reserve_minutes") or 0.0), SESSION_RESERVE_MINUTES)
    return {"deadline": deadline, "reserve_minutes": reserve, "hours_left": max(left, 0.0)}


def train_stage(
    paths: NotebookPaths,
    config: str,
    dataset: str,
    *,
    profile: str = "paper",
    epochs: int | None = None,
    device: str | None = None,
    init: str | Path | None = None,
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    extend: bool = False,
    processes: int | None = None,
    input_root: Path = KAGGLE_INPUT,
) -> dict[str, Any]:
    """``cellmask train`` of config ``config`` (:func:`stage_config`) on ``dataset`` into
    ``paths.run(dataset, config)``.

    Args:
        resume_from: the run to continue (a paper-scale stage takes longer than one Kaggle
            session): a run directory, an earlier kernel version's output folder, or that
            kernel ``owner/slug/N`` attached as a kernel source
            (:func:`cellmask.data.inputs.resume_run`); copied into the run directory and
            continued from its ``last.pt``, bit-exactly where it stopped. Its config and epochs
            must be the run's (``epochs=None``: the run's own); a longer schedule needs ``extend``.
        extend: allow a continuation to lengthen the schedule (``epochs`` above the run's).
        processes: DDP processes, one per GPU (:func:`cellmask.engine.launch.launch`; ``None``:
            every visible GPU, 1 on the CPU). ``train.batch_size`` is the total over them when it
            divides evenly (the paper's 2 on a T4 x2: 1 per GPU).
        input_root: where Kaggle mounts the inputs.
        the rest: as :func:`cellmask.training.command.run_training` and :func:`cellmask.config.load_config`.

    On Kaggle a config without ``train.max_hours`` / ``train.deadline`` gets the session's
    deadline (:func:`session_budget`): :data:`KAGGLE_SESSION_HOURS` from the session's start, less
    room for the last validation and save; training stops cleanly after the step that reaches
    it, ``last.pt`` written, and the notebook goes on to the end (the kernel completes; the next
    version continues with ``RESUME_FROM``).

    Returns:
        :func:`~cellmask.training.command.run_training`'s result (rank 0's; without the model
        when several processes trained), plus ``run_dir`` and ``processes``.
    """
    from cellmask.engine.launch import launch

    cfg = stage_config(paths, config, dataset, profile, overrides)
    budget = session_budget(cfg)
    if budget is not None:
        cfg["train"]["deadline"] = budget["deadline"]
        cfg["train"]["reserve_minutes"] = budget["reserve_minutes"]
        print(
            f"train.deadline: {budget['hours_left']:.2f} h left of this Kaggle session's "
            f"{KAGGLE_SESSION_HOURS} h (counted from its start), {budget['reserve_minutes']:.0f} min kept "
            "for the last validation and save"
        )
    run_dir = Path(out_dir) if out_dir is not None else paths.run(dataset, config)
    resume = False
    if resume_from is not None:
        previous = resume_run(resume_from, dataset, config, input_root)
        print(f"continuing {previous} (last.pt) in {run_dir}")
        shutil.copytree(previous, run_dir, dirs_exist_ok=True)
        resume = True
    processes = default_processes(device) if processes is None else int(processes)
    if processes > 1:
        total = int(cfg["train"].get("batch_size") or 1)
        if total % processes == 0:
            cfg["train"]["batch_size"] = total // processes
            print(f"DDP on {processes} processes: train.batch_size {total} in all, {total // processes} each")
        else:
            print(f"DDP on {processes} processes: train.batch_size {total} each ({total * processes} in all)")
    options = {"init": init, "resume": resume, "epochs": epochs, "device": device, "extend": extend}
    result = launch(_train_rank, processes, cfg, str(paths.data), dataset, str(run_dir), options)
    best = result.get("best")
    summary = f"best {best['metric']} {best['value']:.4f} at epoch {best['epoch']}" if best else "no best"
    print(f"{config} on {dataset} ({profile}): {summary}; run directory {run_dir}")
    result.update(run_dir=run_dir, processes=processes)
    return result


def default_processes(device: str | None = None) -> int:
    """Training processes for ``device``: every visible GPU (both of a T4 x2), 1 on the CPU."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return 1
    return max(torch.cuda.device_count(), 1)


def _train_rank(cfg: dict[str, Any], data: str, dataset: str, run_dir: str, options: dict[str, Any]) -> dict:
    """One process of :func:`train_stage`: ``run_training``; rank 0 returns what pickles (no model)."""
    from cellmask.training.command import run_training

    result = run_training(cfg, data, dataset, run_dir, **options)
    return {k: v for k, v in result.items() if k not in ("model", "init")} | {"init": str(result.get("init"))}


def check_code_version(input_root: Path = KAGGLE_INPUT) -> str:
    """Print (and return) the version of the cellmask this kernel runs; stop when the wheel it
    installed and the cellmask-code dataset it reads configs from come from different checkouts.

    Both carry a build stamp (:mod:`cellmask.kaggle.stamp`): the wheel in ``cellmask.__version__``
    (``0.1.0+gabc1234``, ``.dirty.<digest>`` for uncommitted changes), the code dataset in its
    ``cellmask-build.json``. In a checkout (no code dataset attached) only the version is printed.

    Raises:
        RuntimeError: the two differ (the message names both and what to push).
    """
    import cellmask
    from cellmask.kaggle.stamp import read_stamp

    installed = cellmask.__version__
    code = find(CODE_INPUT, input_root) if input_root.is_dir() else None
    stamp = read_stamp(code) if code is not None else None
    if stamp is not None and stamp.get("version") != installed:
        raise RuntimeError(
            f"the cellmask wheel installed here is {installed} but the cellmask-code dataset attached "
            f"({code}) is {stamp.get('version')}: they come from different checkouts, so this kernel "
            "would train or predict with configs the code was not written for. Run `make push-datasets` "
            "(it rebuilds and pushes both), then push this kernel again (it waits for the new versions)"
        )
    where = f"; code dataset {code} carries the same" if stamp is not None else ""
    line = f"cellmask {installed}{where}"
    print(line)
    return line
