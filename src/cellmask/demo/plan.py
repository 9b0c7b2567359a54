"""What the demo trains: the runs (config, dataset, initialisation) and the synthetic data.

A :class:`Stage` is one ``cellmask train`` run of the demo. :func:`demo_stages` lists the
whole method (the four branches and the segmenter); :func:`ablation_stages` adds what
``make ablation`` measures besides (the Cascade Mask R-CNN baseline, LIVECell pretraining).
Every number comes from the configs' profiles; a stage adds no number of its own except the
initialisation it names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BRANCHES",
    "DATASETS",
    "QUICK_DATASET",
    "QUICK_EPOCHS",
    "SEGMENTER",
    "Stage",
    "ablation_stages",
    "default_config_dir",
    "demo_stages",
    "repo_root",
]

BRANCHES: tuple[str, ...] = (
    "faster_rcnn_swin_t",
    "cascade_rcnn_resnext101",
    "cascade_rcnn_resnest101",
    "soft_teacher_resnext101",
)
"""The four detector branches (paper, the detection module), by config name; each is also the
name of its run directory under the demo's ``--out``."""

SEGMENTER = "segmenter_upernet_swin_t"
SEGMENTER_FINETUNE = "segmenter_upernet_swin_t_finetune"
BASELINE = "cascade_mask_rcnn_resnext101"
IMAGE_TYPE = "image_type"
"""The image-type classifier's stage and config (``configs/image_type.yaml``; not in the paper):
trained on a competition root, where the detectors' vote picks a type poorly."""

SOFT_TEACHER_INIT = "cascade_rcnn_resnext101"
"""The run whose weights start Soft Teacher (``--init``): as the paper starts it from a trained
Faster R-CNN, the demo starts it from branch 2's Cascade R-CNN ResNeXt (the same backbone):
its backbone, FPN and RPN, and its first cascade stage as the Faster R-CNN box head
(:func:`cellmask.demo.training.cascade_stage1_as_faster_rcnn`)."""

DATASETS: dict[str, dict[str, Any]] = {
    # 96 annotated images: 77 train / 19 val (train.val_fraction 0.2, grouped by sample);
    # 256x352 crops keep the cells at their native pixel size.
    "demo": {"train": 96, "unlabeled": 48, "test": 3, "livecell": 0, "size": (256, 352)},
    "smoke": {"train": 12, "unlabeled": 4, "test": 2, "livecell": 0, "size": (128, 160)},
}
"""``cellmask synth`` arguments per profile (``--quick`` uses :data:`QUICK_DATASET`)."""

ABLATION_LIVECELL: dict[str, int] = {"demo": 60, "smoke": 8}
"""Synthetic LIVECell images ``make ablation`` and ``cellmask demo --livecell`` add for their
pretraining stages."""

QUICK_DATASET: dict[str, Any] = {"train": 8, "unlabeled": 2, "test": 2, "livecell": 0, "size": (128, 160)}
QUICK_EPOCHS = 1


def repo_root() -> Path:
    """The source tree this package runs from (an editable install), else the working directory."""
    here = Path(__file__).resolve().parents[3]
    return here if (here / "configs").is_dir() else Path()


def default_config_dir() -> Path:
    """``configs/`` of the source tree (an editable install), else ``./configs``."""
    return repo_root() / "configs"


@dataclass(frozen=True)
class Stage:
    """One training run of the demo.

    Attributes:
        name: the run directory's name under the demo's ``--out`` (unique).
        config: the config file's name in ``configs/`` (without ``.yaml``).
        role: ``branch`` (an ensemble detector), ``segmenter``, ``baseline`` (Cascade Mask
            R-CNN, own masks), ``classifier`` (the image-type classifier), ``pretrain`` (a
            LIVECell stage) or ``variant`` (an ablation model scored beside the branches).
        dataset: ``sartorius`` or ``livecell``.
        init: the stage whose ``best.pt`` initialises this one (``--init``), or ``None``.
        overrides: ``--set`` strings on top of the profile.
        label: the name shown in tables (default: the model's name).
    """

    name: str
    config: str
    role: str = "branch"
    dataset: str = "sartorius"
    init: str | None = None
    overrides: tuple[str, ...] = ()
    label: str | None = None
    depends: tuple[str, ...] = field(default=())

    @property
    def needs(self) -> tuple[str, ...]:
        """Stages that must finish first."""
        return tuple(dict.fromkeys(([self.init] if self.init else []) + list(self.depends)))


TRAINING_ORDER: tuple[str, ...] = (
    "faster_rcnn_swin_t",
    "cascade_rcnn_resnext101",
    "soft_teacher_resnext101",
    "cascade_rcnn_resnest101",
    SEGMENTER,
)
"""Priority of the runs when a worker frees up (the first ready one starts): the longest run
and Soft Teacher's start first, so the two workers finish close together (two workers: Swin-T
then ResNeSt on one, ResNeXt, Soft Teacher and the segmenter on the other)."""


def demo_stages(branches: Sequence[str] = BRANCHES, livecell: bool = False) -> list[Stage]:
    """The whole method, in :data:`TRAINING_ORDER`: the chosen branches (Soft Teacher starts
    from branch 2's weights when that branch is trained too) and the segmenter.

    With ``livecell`` the paper's two stages: every model but Soft Teacher is first trained on
    the LIVECell images (stage ``livecell/<name>``, listed first so that they start first), then
    fine-tuned from those weights on the competition images; the segmenter's fine-tuning uses
    its fine-tuning config. Soft Teacher starts from branch 2's fine-tuned run as without.
    """
    unknown = [b for b in branches if b not in BRANCHES]
    if unknown:
        raise ValueError(f"unknown branch(es) {unknown}; known: {', '.join(BRANCHES)}")
    pretrain, stages = [], []
    for name in TRAINING_ORDER:
        if name == SEGMENTER:
            if livecell:
                pretrain.append(Stage("livecell/segmenter", SEGMENTER, "pretrain", "livecell"))
                stages.append(Stage("segmenter", SEGMENTER_FINETUNE, "segmenter", init="livecell/segmenter"))
            else:
                stages.append(Stage("segmenter", SEGMENTER, "segmenter"))
        elif name in branches:
            if name == "soft_teacher_resnext101":
                teacher = SOFT_TEACHER_INIT in branches
                stages.append(Stage(name, name, "branch", init=SOFT_TEACHER_INIT if teacher else None))
            elif livecell:
                pretrain.append(Stage(f"livecell/{name}", name, "pretrain", "livecell"))
                stages.append(Stage(name, name, "branch", init=f"livecell/{name}"))
            else:
                stages.append(Stage(name, name, "branch"))
    return pretrain + stages


def ablation_stages() -> list[Stage]:
    """What ``make ablation`` trains beyond the demo: the paper's baseline, and the paper's
    LIVECell pretraining (the first stage of every model) for branch 2 and the segmenter,
    each then fine-tuned on the competition images as the demo's runs are trained."""
    return [
        Stage(BASELINE, BASELINE, "baseline"),
        Stage("livecell/cascade_rcnn_resnext101", "cascade_rcnn_resnext101", "pretrain", "livecell"),
        Stage(
            "livecell_ft/cascade_rcnn_resnext101",
            "cascade_rcnn_resnext101",
            "variant",
            init="livecell/cascade_rcnn_resnext101",
            label="Cascade R-CNN ResNeXt-101, LIVECell-pretrained",
        ),
        Stage("livecell/segmenter", SEGMENTER, "pretrain", "livecell"),
        Stage(
            "livecell_ft/segmenter",
            SEGMENTER_FINETUNE,
            "variant",
            init="livecell/segmenter",
            label="UperNet Swin-T, LIVECell-pretrained",
        ),
    ]


def check_stages(stages: Sequence[Stage], available: Mapping[str, Any] | None = None) -> None:
    """Names are unique and every ``needs`` is a stage of the list (or already ``available``)."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    known = set(names) | set(available or {})
    for s in stages:
        missing = [n for n in s.needs if n not in known]
        if missing:
            raise ValueError(f"stage {s.name} needs {missing}, which no stage trains")
