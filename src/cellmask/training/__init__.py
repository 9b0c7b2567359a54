"""Training: the ``cellmask train`` command (:mod:`~cellmask.training.command`), the data a run
sees (:mod:`~cellmask.training.split`), what each model type trains
(:mod:`~cellmask.training.parts`, Soft Teacher's in :mod:`~cellmask.training.soft_teacher`) and
validation by COCO AP (:mod:`~cellmask.training.validation`), over the generic loop of
:mod:`cellmask.engine`."""

from cellmask.training.command import add_train_arguments, cli_train, run_training
from cellmask.training.parts import detector_parts, parts_builder, segmenter_parts
from cellmask.training.split import DATASETS, competition_split, load_split

__all__ = [
    "DATASETS",
    "add_train_arguments",
    "cli_train",
    "competition_split",
    "detector_parts",
    "load_split",
    "parts_builder",
    "run_training",
    "segmenter_parts",
]
