"""Shared fixtures: paths to the real competition samples copied under tests/fixtures, the
one-thread guard of the torch tests, and the augmentation/box helpers of the data tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
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


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch intra-op thread (deterministic; the test machine's cores are shared) for a whole
    module, module-scoped fixtures included; restored afterwards. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


AUGMENT_OFF = {
    "hflip": 0,
    "vflip": 0,
    "shift_scale_rotate": None,
    "brightness_contrast": None,
    "gaussian_blur": None,
    "median_blur": None,
}


@pytest.fixture(scope="session")
def augment_only() -> Callable[..., dict]:
    """``augment_only(**ops)``: an augment config with every op off except ``ops``."""

    def only(**ops) -> dict:
        return {**AUGMENT_OFF, **ops}

    return only


@pytest.fixture(scope="session")
def tight_boxes() -> Callable[[np.ndarray], np.ndarray]:
    """``tight_boxes(masks)``: pixel-edge xyxy float32 ``[N, 4]`` boxes of a mask stack, computed
    independently of the code under test."""

    def boxes(masks: np.ndarray) -> np.ndarray:
        out = []
        for m in np.asarray(masks, dtype=bool):
            ys, xs = np.nonzero(m)
            out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        return np.asarray(out, dtype=np.float32).reshape(-1, 4)

    return boxes
