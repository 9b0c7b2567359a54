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
from cellmask.paths import KAGGLE_INPUT, KAGGLE_WORKING, on_kaggle


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
    input_root: Path = KAGGLE_INPUT,
) -> Path | None:
    """The checkpoint a fine-tuning stage of ``branch`` starts from (notebooks 02-05).

    ``init`` if given; ``None`` (the config's ImageNet backbone) if ``from_imagenet``; else the
    ``best.pt`` of the branch's LIVECell run ``livecell/<branch>`` (notebook 01) under ``roots``
    or any input (:func:`cellmask.data.inputs.find_run`). Without one, the ``paper`` profile
    stops (hours of GPU training from ImageNet weights would not be the paper's model); the
    other profiles (demo, smoke) go on from the config's backbone (``None``).

    Raises:
        ValueError: both ``init`` and ``from_imagenet``.
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


LIVECELL_RECIPE = ("optimizer", "lr", "weight_decay", "scheduler", "epochs")
"""The ``train:`` keys the LIVECell stage of a Soft Teacher branch takes from ``base.yaml``: the
detectors' recipe (AdamW, lr 1e-4, weight decay 1e-2, cosine, 36 epochs), as the header of
``configs/soft_teacher_resnext101.yaml`` sets them with ``--set``."""


def stage_config(
    paths: NotebookPaths, config: str, dataset: str, profile: str = "paper", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """The resolved config of one training stage: ``configs/<config>.yaml`` for ``profile`` with
    ``overrides``.

    A ``soft_teacher`` config on LIVECell is its plain Faster R-CNN (the paper's stage 1: there
    are no unlabeled LIVECell images): ``model.type: faster_rcnn``, no ``semi:`` section, and
    :data:`LIVECELL_RECIPE` from ``base.yaml`` for the same profile. The Soft Teacher stage then
    starts student and teacher from that run (``init``).
    """
    from cellmask.config import deep_merge, load_config, parse_overrides

    cfg = load_config(paths.config(config), profile=profile)
    if dataset == "livecell" and cfg["model"]["type"] == "soft_teacher":
        base = load_config(paths.config("base"), profile=profile)
        cfg["model"]["type"] = "faster_rcnn"
        cfg.pop("semi", None)
        cfg["train"].update({k: base["train"][k] for k in LIVECELL_RECIPE})
        print(
            f"{config} on LIVECell: its plain Faster R-CNN with the detectors' recipe (the paper's stage 1)"
        )
    return deep_merge(cfg, parse_overrides(overrides)) if overrides else cfg


KAGGLE_SESSION_HOURS = 11.5
"""The training budget of one Kaggle GPU session (Kaggle ends a session after 12 hours; the half
hour left is for the notebook's last cells and for saving the output)."""
SESSION_START = time.monotonic()
"""When this module was first imported: in a notebook, within a minute of the session's start."""


def session_budget(
    cfg: Mapping[str, Any], kaggle: bool | None = None, now: float | None = None
) -> float | None:
    """``train.max_hours`` for a training stage on Kaggle whose config sets none: what is left of
    :data:`KAGGLE_SESSION_HOURS` since :data:`SESSION_START` (at least a minute); ``None`` off
    Kaggle or when the config sets one."""
    if not (on_kaggle() if kaggle is None else kaggle) or (cfg.get("train") or {}).get("max_hours"):
        return None
    spent = ((time.monotonic() if now is None else now) - SESSION_START) / 3600.0
    return max(KAGGLE_SESSION_HOURS - spent, 1 / 60)


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
    input_root: Path = KAGGLE_INPUT,
) -> dict[str, Any]:
    """``cellmask train`` of config ``config`` (:func:`stage_config`) on ``dataset`` into
    ``paths.run(dataset, config)``.

    Args:
        resume_from: the run to continue (a paper-scale stage takes longer than one Kaggle
            session): a run directory, an earlier kernel version's output folder, or that
            kernel ``owner/slug/N`` attached as a kernel source
            (:func:`cellmask.data.inputs.resume_run`); copied into the run directory and
            continued from its ``last.pt``, bit-exactly where it stopped.
        input_root: where Kaggle mounts the inputs.

    On Kaggle a config without ``train.max_hours`` gets the rest of the session's
    :data:`KAGGLE_SESSION_HOURS` (:func:`session_budget`): training stops cleanly after the step
    that passes it, ``last.pt`` written, and the notebook goes on to the end (the kernel
    completes; the next version continues with ``RESUME_FROM``).
        the rest: as :func:`cellmask.training.command.run_training` and :func:`cellmask.config.load_config`.

    Returns:
        :func:`~cellmask.training.command.run_training`'s result, plus ``run_dir``.
    """
    from cellmask.training.command import run_training

    cfg = stage_config(paths, config, dataset, profile, overrides)
    budget = session_budget(cfg)
    if budget is not None:
        cfg["train"]["max_hours"] = budget
        print(f"train.max_hours {budget:.2f}: the rest of this Kaggle session's {KAGGLE_SESSION_HOURS} h")
    run_dir = Path(out_dir) if out_dir is not None else paths.run(dataset, config)
    resume = False
    if resume_from is not None:
        previous = resume_run(resume_from, dataset, config, input_root)
        print(f"continuing {previous} (last.pt) in {run_dir}")
        shutil.copytree(previous, run_dir, dirs_exist_ok=True)
        resume = True
    result = run_training(
        cfg, paths.data, dataset, run_dir, init=init, resume=resume, epochs=epochs, device=device
    )
    best = result.get("best")
    summary = f"best {best['metric']} {best['value']:.4f} at epoch {best['epoch']}" if best else "no best"
    print(f"{config} on {dataset} ({profile}): {summary}; run directory {run_dir}")
    result["run_dir"] = run_dir
    return result


def validation_records(run_dir: str | Path, data: str | Path) -> list[Any]:
    """The validation images of a run: the split its own ``config.yaml`` made of ``data``."""
    import yaml

    from cellmask.training.split import load_split

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    dataset = (cfg.get("data") or {}).get("dataset", "sartorius")
    return load_split(cfg, data, dataset)[1]


def instance_table(records: Sequence[Any]) -> Any:
    """A pandas DataFrame with one row per instance: ``image_id``, ``cell_type``, ``area``
    (pixels), ``box_w``, ``box_h``."""
    import numpy as np
    import pandas as pd

    from cellmask.data.rle import rle_area

    rows = []
    for r in records:
        boxes = np.asarray(r.boxes, dtype=float).reshape(-1, 4)
        for i, rle in enumerate(r.rles()):
            x0, y0, x1, y1 = boxes[i]
            rows.append((r.image_id, r.cell_type, rle_area(rle, r.height, r.width), x1 - x0, y1 - y0))
    return pd.DataFrame(rows, columns=["image_id", "cell_type", "area", "box_w", "box_h"])


def detect_records(checkpoint: str | Path, records: Sequence[Any], device: str | None = None) -> list[dict]:
    """Raw detections ``{"boxes", "scores", "labels"}`` (numpy) of a detector checkpoint on
    every record's image."""
    from cellmask.data.images import read_image
    from cellmask.predict import detect, load_detector

    model, _ = load_detector(checkpoint, device or "cpu")
    out = []
    for r in records:
        boxes, scores, labels = detect(model, read_image(r.path, (r.height, r.width)))
        out.append({"boxes": boxes.numpy(), "scores": scores.numpy(), "labels": labels.numpy()})
    return out


def plot_detections(
    records: Sequence[Any], detections: Sequence[Mapping[str, Any]], min_score: float = 0.5
) -> Any:
    """One panel per record: truth boxes (green) and detections scoring >= ``min_score`` (red)."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from cellmask.data.images import read_image

    fig = Figure(figsize=(5 * len(records), 4), layout="constrained")
    for i, (r, det) in enumerate(zip(records, detections, strict=True)):
        ax = fig.add_subplot(1, len(records), i + 1)
        ax.imshow(read_image(r.path, (r.height, r.width)), cmap="gray")
        keep = np.asarray(det["scores"]) >= min_score
        for boxes, color in ((np.asarray(r.boxes), "lime"), (np.asarray(det["boxes"])[keep], "red")):
            for x0, y0, x1, y1 in boxes.reshape(-1, 4):
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=color, lw=0.8))
        ax.set_title(f"{r.image_id} ({r.cell_type}): {len(r)} truth, {int(keep.sum())} detected", fontsize=9)
        ax.set_axis_off()
    return fig


def plot_bars(table: Mapping[str, Mapping[str, float]], ylabel: str, title: str = "") -> Any:
    """Grouped bars: one group per inner key (e.g. class), one bar per outer key (e.g. model),
    each labelled with its value (``n/a`` for NaN, e.g. a class without validation images)."""
    import numpy as np
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys(k for row in table.values() for k in row))
    fig = Figure(figsize=(max(4.0, 1.5 * len(groups) + 2), 3.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(table))
    for j, (name, row) in enumerate(table.items()):
        xs = np.arange(len(groups)) + j * width
        values = [float(row.get(g, np.nan)) for g in groups]
        bars = ax.bar(xs, np.nan_to_num(values), width=width, label=name)
        ax.bar_label(bars, labels=["n/a" if np.isnan(v) else f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks(np.arange(len(groups)) + width * (len(table) - 1) / 2, groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def segment_truth_boxes(
    checkpoint: str | Path, records: Sequence[Any], device: str | None = None
) -> dict[str, list[str]]:
    """``{image_id: [rle, ...]}``: the segmenter checkpoint's mask of every truth box of each
    record (what its validation mIoU measures), for :func:`cellmask.demo.save_comparison`."""
    from cellmask.data.images import read_image
    from cellmask.data.rle import rle_encode
    from cellmask.predict import load_segmenter, segment

    model, _ = load_segmenter(checkpoint, device or "cpu")
    out = {}
    for r in records:
        pasted, _ = segment(model, read_image(r.path, (r.height, r.width)), r.boxes)
        out[r.image_id] = [rle_encode(pasted.mask(i).numpy()) for i in range(len(pasted))]
    return out
