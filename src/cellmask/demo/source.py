"""Where the demo's images come from: a synthetic root it writes, or any Kaggle-layout root.

``cellmask demo`` runs one flow on either source (:func:`resolve_source`):

- **synthetic** (``make demo``): ``cellmask synth`` writes a small Kaggle-layout dataset under
  ``--data`` (default ``data/demo``) and the flow trains and scores on it;
- **a root** (``make demo-real``, ``cellmask demo --data DIR``): the competition's own files
  (``../shared/sartorius``, a ``make data`` download, ``/kaggle/input/...``), read as they are.
  Nothing is written there.

A root needs ``train.csv`` and ``train/``; the rest is optional and its absence is a note in
the run's summary, not a crash: without ``train_semi_supervised/`` Soft Teacher is left out,
without ``test/`` no test submission is written, without ``LIVECell_dataset_2021/`` the
``--livecell`` stages cannot run (:func:`root_notes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cellmask.errors import DataError

__all__ = ["DataSource", "is_synthetic_root", "resolve_source", "root_notes"]


@dataclass(frozen=True)
class DataSource:
    """The demo's data.

    Attributes:
        root: the Kaggle-layout folder.
        synthetic: the images are ``cellmask synth``'s (written for this run or an earlier one).
        write: the synthetic dataset is written by this run (else the folder is read as it is).
        unlabeled: unlabeled images for Soft Teacher are there (or will be: a written dataset).
        notes: what the root lacks and what the run does without it (empty for a full root).
    """

    root: Path
    synthetic: bool
    write: bool = False
    unlabeled: bool = True
    notes: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "synthetic" if self.synthetic else "root"


def is_synthetic_root(root: str | Path) -> bool:
    """True when ``root`` holds a dataset ``cellmask synth`` wrote (its marker file is there)."""
    from cellmask.data.synthetic.writers import written_by_synth

    return written_by_synth(Path(root))


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def root_notes(root: str | Path, livecell: bool = False) -> tuple[str, ...]:
    """What an annotated root lacks, each with its consequence for the demo (``livecell``: the
    run wants the LIVECell stages)."""
    from cellmask.paths import CompetitionLayout

    layout = CompetitionLayout(Path(root))
    notes = []
    if not _has_files(layout.semi_supervised_dir):
        notes.append(
            f"no unlabeled images in {layout.semi_supervised_dir}: Soft Teacher (branch 4) is left out"
        )
    if not _has_files(layout.test_dir):
        notes.append(f"no images in {layout.test_dir}: no test submission is written")
    if livecell and not layout.livecell_root.is_dir():
        notes.append(
            f"no {layout.livecell_root}: the LIVECell pretraining stages need it "
            "(cellmask synth --livecell writes a synthetic one)"
        )
    return tuple(notes)


def resolve_source(data: str | Path, synth: bool | None = None, livecell: bool = False) -> DataSource:
    """The demo's data source for ``--data``.

    Args:
        data: the folder.
        synth: ``True``: write a synthetic dataset there; ``False``: read it as it is (it must
            be an annotated root); ``None``: decide: a folder with ``train.csv`` that
            ``cellmask synth`` did not write is read as it is, anything else (missing, empty,
            or an earlier synthetic dataset) is (re)written.
        livecell: the run wants the LIVECell stages (a note if the root lacks them).

    Raises:
        DataError: a root to read that has no ``train.csv`` or ``train/`` (the message names
            both paths and how to get the data).
    """
    from cellmask.paths import CompetitionLayout

    root = Path(data)
    if synth is None:
        synth = not (root / "train.csv").is_file() or is_synthetic_root(root)
    if synth:
        return DataSource(root, True, write=True)
    missing = [p for p in (root / "train.csv", root / "train") if not p.exists()]
    if missing:
        raise DataError(
            f"{root}: not a Kaggle-layout competition root: looked for "
            + " and ".join(str(p) for p in missing)
            + " (download the competition with `make data`, or pass --data DIR)"
        )
    unlabeled = _has_files(CompetitionLayout(root).semi_supervised_dir)
    return DataSource(root, is_synthetic_root(root), False, unlabeled, root_notes(root, livecell))
