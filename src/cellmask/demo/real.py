"""The sim-to-real check: the demo's models on real annotated competition images.

``tests/fixtures/sartorius_real/`` holds 6 real training images of the competition
(``train.csv`` + ``train/``: 2 per cell type, 520x704). The demo trains on 256x352 synthetic
crops in which cells have their native pixel size, and its detectors resize every input to
their training size (``model.transform``: short side 256, long side at most 352). A real
520x704 image would be shrunk about 2x, its cells with it, so :func:`native_size` sets every
branch's transform to the image's own size for the duration of the scoring: the models see the
real cells at the size they were trained on. The segmenter works on RoIAlign crops of each box
and needs no change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cellmask.demo.plan import repo_root

__all__ = ["REAL_FIXTURES", "native_size", "real_records", "score_real"]

REAL_FIXTURES = Path("tests") / "fixtures" / "sartorius_real"
"""The real annotated images, relative to the source tree."""


def real_records(root: str | Path | None = None) -> list:
    """The records of the real fixture images (``root``: a Kaggle-layout folder with
    ``train.csv`` and ``train/``; default the source tree's fixtures), or ``[]`` when the folder
    is absent (an installed package without its tests)."""
    from cellmask.data.sartorius import read_train_csv

    root = Path(root) if root is not None else repo_root() / REAL_FIXTURES
    if not (root / "train.csv").is_file():
        return []
    return read_train_csv(root / "train.csv", root / "train")


@contextlib.contextmanager
def native_size(models: Iterable[Any], size: tuple[int, int]) -> Iterator[None]:
    """Inside the block every detector of ``models`` detects at ``size`` (H, W) without
    resizing: its ``transform`` gets ``min_size = min(size)`` and ``max_size = max(size)``; the
    previous values come back afterwards."""
    saved = []
    try:
        for model in models:
            t = model.transform
            saved.append((t, t.min_size, t.max_size))
            t.min_size, t.max_size = (int(min(size)),), int(max(size))
        yield
    finally:
        for t, min_size, max_size in saved:
            t.min_size, t.max_size = min_size, max_size


def score_real(
    predictor: Any,
    records: Sequence[Any],
    out: str | Path | None,
    ablation: bool = True,
    baseline: tuple[str, Any] | None = None,
    rows: Sequence[Any] | None = None,
    progress: bool = True,
) -> Any:
    """Score ``predictor`` on real records at their native size (:func:`native_size`; all
    records must share one size; the detection cache is off meanwhile, its key does not see the
    change).

    Returns:
        with ``rows`` (:class:`~cellmask.evaluate.Row` variants): their
        :class:`~cellmask.evaluate.RowResult` list; else an
        :class:`~cellmask.evaluate.EvaluateResult` of :func:`~cellmask.evaluate.evaluate_predictor`
        (every ablation row when ``ablation``, the baseline row with ``baseline``).
    """
    from cellmask.evaluate import evaluate_predictor, run_rows

    sizes = {(r.height, r.width) for r in records}
    if len(sizes) != 1:
        raise ValueError(f"the real images differ in size ({sorted(sizes)}); score them one size at a time")
    models = [b.model for b in predictor.branches] + ([baseline[1]] if baseline else [])
    cache_root, predictor.cache.root = predictor.cache.root, None
    try:
        with native_size(models, next(iter(sizes))):
            if rows is not None:
                return run_rows(predictor, records, rows, baseline[1] if baseline else None, progress)
            return evaluate_predictor(predictor, records, out, ablation, baseline, "real", progress)
    finally:
        predictor.cache.root = cache_root
