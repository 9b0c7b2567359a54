"""Cross-validation folds: stratified by cell type, grouped by ``sample_id``.

Images of one sample (same well and vessel, different time points) look nearly alike, so a
sample never straddles two folds; within that, every fold gets about the same share of each
cell type. ``sample_id`` is empty in some real rows: the readers already fall back to the
image id there, so such an image is a group of its own.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from cellmask.data.records import ImageRecord


def make_folds(records: Sequence[ImageRecord], n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Assign every record a fold.

    Groups (by ``sample_id``, or ``image_id`` where that is empty) are dealt out per cell type
    (a group's type is its most common one), largest group first, each to the fold that so far
    holds the fewest images of that type; ties go to the fold with fewest images overall, then
    to a seeded random order.

    Args:
        records: images to split; ``cell_type`` may be ``None`` (one stratum).
        n_folds: number of folds (>= 2).
        seed: makes the tie-breaking order reproducible.

    Returns:
        int64 ``[len(records)]`` fold index per record, in ``0 .. n_folds - 1``.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        groups[record.sample_id or record.image_id].append(i)
    if len(groups) < n_folds:
        raise ValueError(f"{len(groups)} sample groups cannot fill {n_folds} folds")

    rng = np.random.default_rng(seed)
    by_type: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        cell_type = Counter(str(records[i].cell_type) for i in members).most_common(1)[0][0]
        by_type[cell_type].append(key)

    folds = np.full(len(records), -1, dtype=np.int64)
    fold_total = np.zeros(n_folds, dtype=np.int64)
    for cell_type in sorted(by_type):
        keys = by_type[cell_type]
        order = rng.permutation(len(keys))
        keys = sorted((keys[j] for j in order), key=lambda k: -len(groups[k]))  # stable: ties stay shuffled
        fold_type = np.zeros(n_folds, dtype=np.int64)
        tie_break = rng.permutation(n_folds)
        for key in keys:
            fold = min(range(n_folds), key=lambda f: (fold_type[f], fold_total[f], tie_break[f]))
            members = groups[key]
            folds[members] = fold
            fold_type[fold] += len(members)
            fold_total[fold] += len(members)
    return folds


class Split(NamedTuple):
    """Records of one split: ``train`` (fitted), ``val`` (training's validation: best epoch,
    threshold tuning) and ``holdout`` (scored only: no model and no threshold sees it)."""

    train: list[ImageRecord]
    val: list[ImageRecord]
    holdout: list[ImageRecord]


def split_records(
    records: Sequence[ImageRecord], val_fraction: float, holdout_fraction: float = 0.0, seed: int = 0
) -> Split:
    """Train / validation / held-out records, grouped by sample and stratified by cell type.

    :func:`make_folds` with ``n = round(1 / val_fraction)`` folds: fold 0 is the validation set,
    the next ``round(holdout_fraction * n)`` folds the held-out set, the rest training. No image
    (and no sample group) is on two sides.

    Raises:
        ValueError: a fraction outside its range, a ``holdout_fraction`` that is not a whole
            number of folds (e.g. 0.1 with ``val_fraction`` 0.1 is one fold; 0.15 is not), or
            fewer sample groups than folds.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_folds = max(2, round(1 / val_fraction))
    n_holdout = holdout_fraction * n_folds
    if holdout_fraction < 0 or abs(n_holdout - round(n_holdout)) > 1e-6 or round(n_holdout) > n_folds - 2:
        raise ValueError(
            f"holdout_fraction must be a whole number of the {n_folds} folds of val_fraction "
            f"{val_fraction} (0, {1 / n_folds:g}, {2 / n_folds:g}, ...) leaving one to train on, "
            f"got {holdout_fraction}"
        )
    n_holdout = round(n_holdout)
    if n_holdout and n_folds < 3:
        raise ValueError(f"val_fraction {val_fraction} leaves no fold to train on beside a held-out one")
    folds = make_folds(records, n_folds=n_folds, seed=seed)
    train = [r for r, f in zip(records, folds, strict=True) if f > n_holdout]
    val = [r for r, f in zip(records, folds, strict=True) if f == 0]
    holdout = [r for r, f in zip(records, folds, strict=True) if 0 < f <= n_holdout]
    return Split(train, val, holdout)


def train_val_split(
    records: Sequence[ImageRecord], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split into train and validation records (the paper uses 95/5), grouped and stratified.

    Uses :func:`make_folds` with ``round(1 / val_fraction)`` folds and takes fold 0 as validation
    (:func:`split_records` without a held-out set).
    """
    split = split_records(records, val_fraction, 0.0, seed)
    return split.train, split.val
