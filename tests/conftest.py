"""Shared fixtures: paths to the real competition samples copied under tests/fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
REAL = FIXTURES / "sartorius_real"


@pytest.fixture(scope="session")
def real_root() -> Path:
    """Root of the real Sartorius sample (train.csv, train/, test/, livecell/)."""
    return REAL


@pytest.fixture(scope="session")
def real_records():
    """The 6 real annotated images as records (read once per session)."""
    from cellmask.data.sartorius import read_train_csv

    return read_train_csv(REAL / "train.csv")


@pytest.fixture(scope="session")
def real_rows() -> list[dict[str, str]]:
    """Every row of the real train.csv, verbatim."""
    import csv

    with (REAL / "train.csv").open(newline="") as f:
        return list(csv.DictReader(f))
