"""The data a training run sees: LIVECell's splits, or the competition's images split into
train / val / held-out folds (grouped by sample, stratified by cell type, seeded)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cellmask.config import get

log = logging.getLogger("cellmask.training.command")

DATASETS = ("sartorius", "livecell")


def competition_split(cfg: dict[str, Any], data_root: str | Path):
    """The competition images under ``data_root`` as a :class:`~cellmask.data.folds.Split`:
    ``train.val_fraction`` for training's validation, ``train.holdout_fraction`` (default 0) held
    out for scoring only, grouped by sample and stratified by cell type, seeded by ``train.seed``.

    Raises:
        FileNotFoundError: a file of the layout is missing (the reader names it).
        DataError: fewer than 2 annotated images, or all in one sample group.
    """
    from cellmask.data.folds import split_records
    from cellmask.data.sartorius import read_train_csv
    from cellmask.errors import DataError
    from cellmask.paths import CompetitionLayout

    layout = CompetitionLayout(Path(data_root))
    records = read_train_csv(layout.train_csv, layout.train_dir)
    if len(records) < 2:
        raise DataError(
            f"{layout.train_csv}: {len(records)} annotated image(s); need at least 2 to train and validate"
        )
    fraction = float(get(cfg, "train.val_fraction", 0.05))
    holdout = float(get(cfg, "train.holdout_fraction", 0.0) or 0.0)
    groups = len({r.sample_id or r.image_id for r in records})
    if groups < 2:
        raise DataError(
            f"{layout.train_csv}: all images belong to one sample; cannot split off a validation set"
        )
    if round(1 / fraction) > groups:  # small (e.g. synthetic) data: fewer sample groups than folds
        fraction = 1.0 / groups
        log.warning("only %d sample groups: validation fraction raised to 1/%d", groups, groups)
        if holdout:
            holdout = fraction if groups >= 3 else 0.0
    return split_records(
        records, val_fraction=fraction, holdout_fraction=holdout, seed=int(get(cfg, "train.seed", 0))
    )


def load_split(
    cfg: dict[str, Any], data_root: str | Path, dataset: str
) -> tuple[list, list, tuple[str, ...]]:
    """``(train records, val records, class names)`` of ``dataset`` under ``data_root``; the
    competition's held-out images (``train.holdout_fraction``) are in neither.

    Raises:
        FileNotFoundError: a file of the layout is missing (the reader names it).
        DataError: no annotated image, or too few sample groups to split off a validation set.
    """
    from cellmask.data.classes import CLASSES
    from cellmask.data.livecell import LIVECELL_CLASSES, read_livecell
    from cellmask.errors import DataError
    from cellmask.paths import CompetitionLayout

    if dataset == "livecell":
        layout = CompetitionLayout(Path(data_root))
        train = read_livecell(layout.livecell_root, ("train", "test"))
        val = read_livecell(layout.livecell_root, ("val",))
        classes: tuple[str, ...] = LIVECELL_CLASSES
    elif dataset == "sartorius":
        train, val, _ = competition_split(cfg, data_root)
        classes = CLASSES
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if not train:
        raise DataError(f"{data_root}: no training images for dataset {dataset}")
    return train, val, classes
