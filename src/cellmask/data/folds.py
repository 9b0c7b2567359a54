"""Cross-validation folds: stratified by cell type, grouped by ``sample_id``.

Images of one sample (same well and vessel, different time points) look nearly alike, so a
sample never straddles two folds; within that, every fold gets about the same share of each
cell type. ``sample_id`` is empty in some real rows: the readers already fall back to the
image id there, so such an image is a group of its own.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

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


def train_val_split(
    records: Sequence[ImageRecord], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split into train and validation records (the paper uses 95/5), grouped and stratified.

    Uses :func:`make_folds` with ``round(1 / val_fraction)`` folds and takes fold 0 as validation.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_folds = max(2, round(1 / val_fraction))
    folds = make_folds(records, n_folds=n_folds, seed=seed)
    train = [r for r, f in zip(records, folds, strict=True) if f != 0]
    val = [r for r, f in zip(records, folds, strict=True) if f == 0]
    return train, val
