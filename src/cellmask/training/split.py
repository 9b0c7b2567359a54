"""The data a training run sees: LIVECell's splits, or the competition's images split into
train / val / held-out folds (grouped by sample, stratified by cell type, seeded).

LIVECell's val split (570 images) may be cut to a fixed subset (``val.max_images``,
:func:`validation_subset`): the same images every epoch and every run of a seed. The
competition's folds are never cut here.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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


def validation_subset(records: Sequence[Any], max_images: int | None, seed: int) -> list:
    """A fixed subset of ``max_images`` of ``records``, stratified by cell type, in their order.

    Each cell type (``record.cell_type``) keeps its share of the records, to within one image
    (systematic sampling over a seeded shuffle of each type), so the subset's AP weighs the
    types as the whole split does. The draw depends only on ``seed`` and the records' ``image_id``
    and ``cell_type`` (not on their order): every epoch and every run of a seed validates on the
    same images.

    Args:
        records: objects with ``image_id`` and ``cell_type`` (``ImageRecord``s).
        max_images: subset size; ``None`` or 0: every record.
        seed: the draw's seed (``train.seed``).

    Returns:
        ``min(max_images, len(records))`` records (a new list), in the order of ``records``.

    Raises:
        ValueError: ``max_images`` is negative.
    """
    if max_images is not None and int(max_images) < 0:
        raise ValueError(f"val.max_images must be >= 0 or null (0 and null: all images), got {max_images}")
    if not max_images or int(max_images) >= len(records):
        return list(records)
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[int]] = defaultdict(list)
    for i in sorted(range(len(records)), key=lambda i: str(records[i].image_id)):
        by_type[str(records[i].cell_type)].append(i)
    # a record's key: its rank in its type's shuffle, as a fraction of the type, plus one random
    # offset per type; the smallest keys take each type's share of the subset, +-1
    keys = np.empty(len(records))
    for cell_type in sorted(by_type):
        members = np.asarray(by_type[cell_type])
        ranks = np.empty(len(members))
        ranks[rng.permutation(len(members))] = np.arange(len(members))
        keys[members] = (ranks + rng.random()) / len(members)
    chosen = np.sort(np.argsort(keys, kind="stable")[: int(max_images)])
    return [records[i] for i in chosen]


def load_split(
    cfg: dict[str, Any], data_root: str | Path, dataset: str
) -> tuple[list, list, tuple[str, ...]]:
    """``(train records, val records, class names)`` of ``dataset`` under ``data_root``; the
    competition's held-out images (``train.holdout_fraction``) are in neither.

    LIVECell's val records are the :func:`validation_subset` of ``val.max_images`` (null or 0:
    all) seeded by ``train.seed``, as logged; the competition's val fold is never cut.

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
        every_val = read_livecell(layout.livecell_root, ("val",))
        max_images, seed = get(cfg, "val.max_images"), int(get(cfg, "train.seed", 0))
        val = validation_subset(every_val, max_images, seed=seed)
        log.info(
            "livecell: validating on %d of %d val images (val.max_images=%s%s)",
            len(val),
            len(every_val),
            max_images,
            f", a subset stratified by cell type, seeded by train.seed={seed}"
            if len(val) < len(every_val)
            else "",
        )
        classes: tuple[str, ...] = LIVECELL_CLASSES
    elif dataset == "sartorius":
        train, val, _ = competition_split(cfg, data_root)
        classes = CLASSES
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if not train:
        raise DataError(f"{data_root}: no training images for dataset {dataset}")
    return train, val, classes
