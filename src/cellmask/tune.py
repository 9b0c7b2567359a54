"""Moved to :mod:`cellmask.evaluate.tune`. This alias stays for one release, for notebooks written
against the previous one (``from cellmask.tune import tune``, as 08_evaluate had it)."""

import warnings

from cellmask.evaluate.tune import MASK_GRID, SCORE_GRID, TuneResult, tune, tune_predictor

warnings.warn(
    "cellmask.tune moved to cellmask.evaluate.tune; the alias goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["MASK_GRID", "SCORE_GRID", "TuneResult", "tune", "tune_predictor"]
