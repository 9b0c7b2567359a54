"""Shared fixtures: paths to the real competition samples copied under tests/fixtures, the
one-thread guard of the torch tests, and the augmentation/box helpers of the data tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
REAL = FIXTURES / "sartorius_real"
REPO = Path(__file__).resolve().parents[1]
REAL_DATA_ENV = "CELLMASK_REAL_DATA"


def real_data_root() -> Path | None:
    """The real competition data a ``real_data`` test may use, or ``None`` (then it runs the
    version that holds on the fixtures alone, as on a fresh clone).

    ``$CELLMASK_REAL_DATA`` decides when set: a Kaggle-layout root, or ``none`` (or empty) to hide
    the data (CI runs the ``real_data`` tests once that way); else ``$CELLMASK_DATA``, else
    ``../shared/sartorius`` beside the checkout, whichever holds a ``train.csv``.
    """
    import os

    if REAL_DATA_ENV in os.environ:
        chosen = os.environ[REAL_DATA_ENV].strip()
        if chosen.lower() in ("", "none"):
            return None
        if not (Path(chosen) / "train.csv").is_file():
            raise FileNotFoundError(f"${REAL_DATA_ENV}={chosen}: no train.csv there")
        return Path(chosen)
    for candidate in (os.environ.get("CELLMASK_DATA"), REPO.parent / "shared" / "sartorius"):
        if candidate and (Path(candidate) / "train.csv").is_file():
            return Path(candidate)
    return None


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


def copy_checkout(tmp_path: Path, datasets_built: bool = True) -> Path:
    """The parts of the checkout the Kaggle commands read, copied under ``tmp_path/checkout``
    (staging and the make targets write build/ and datasets/ there). ``datasets_built=False``:
    the dataset folders hold only their committed files, as before ``make wheels`` / ``make
    weights``."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "checkout"
    for part in ("configs", "src", "notebooks", "datasets"):
        shutil.copytree(
            repo / part, root / part, ignore=shutil.ignore_patterns("__pycache__", "*.whl", "*.pt")
        )
    for part in ("kernel-metadata.json", "pyproject.toml", "README.md", "Makefile"):
        shutil.copy2(repo / part, root / part)
    if not datasets_built:
        for name in ("cellmask-weights", "cellmask-wheels", "cellmask-code"):
            for path in (root / "datasets" / name).iterdir():
                if path.name not in ("dataset-metadata.json", "base_image.json"):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return root


def run_make(checkout: Path, tmp_path: Path, *args: str, **env: str):
    """``make -s ARGS`` in ``checkout`` (see :func:`copy_checkout`): its venv a wrapper of this
    interpreter, already "installed" (nothing is installed), and no Kaggle CLI, credentials or
    kaggle.json; ``env`` added to the environment. Returns the completed process."""
    import os
    import subprocess
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"  # a wrapper: a symlink would lose the venv's site-packages
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (venv / ".cellmask-installed").touch()
    src = Path(__file__).resolve().parents[1] / "src"
    base = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    base |= {"HOME": str(tmp_path / "nohome"), "PYTHONPATH": str(src), "PATH": os.environ["PATH"]}
    return subprocess.run(
        ["make", "-s", "-C", str(checkout), *args, f"VENV={venv}"],
        env={**base, **env},
        capture_output=True,
        text=True,
    )
