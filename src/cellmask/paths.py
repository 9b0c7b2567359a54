"""Where the data lives: Kaggle's input folder or a local root with the same layout.

The synthetic generator writes the same layout as Kaggle, so every reader takes one root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
DATA_ENV = "CELLMASK_DATA"
LOCAL_DEFAULT_ROOT = Path("data/synthetic")


def on_kaggle() -> bool:
    """True inside a Kaggle kernel (its input folder exists)."""
    return KAGGLE_INPUT.is_dir()


@dataclass(frozen=True)
class CompetitionLayout:
    """Paths of the competition's files under one root (Kaggle's, or a synthetic copy)."""

    root: Path

    @property
    def train_csv(self) -> Path:
        return self.root / "train.csv"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def semi_supervised_dir(self) -> Path:
        return self.root / "train_semi_supervised"

    @property
    def test_dir(self) -> Path:
        return self.root / "test"

    @property
    def sample_submission(self) -> Path:
        return self.root / "sample_submission.csv"

    @property
    def livecell_root(self) -> Path:
        return self.root / "LIVECell_dataset_2021"

    def missing(self) -> list[Path]:
        """The paths of this layout that do not exist (empty when the layout is complete)."""
        paths = [
            self.train_csv,
            self.train_dir,
            self.semi_supervised_dir,
            self.test_dir,
            self.sample_submission,
        ]
        paths += [
            self.livecell_root / "images" / d for d in ("livecell_train_val_images", "livecell_test_images")
        ]
        paths += [
            self.livecell_root / "annotations" / "LIVECell" / f"livecell_coco_{s}.json"
            for s in ("train", "val", "test")
        ]
        return [p for p in paths if not p.exists()]
