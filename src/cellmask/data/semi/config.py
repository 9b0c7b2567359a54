"""The data keys of the ``semi:`` section and their defaults (:data:`DEFAULT_SEMI_DATA`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cellmask.config import deep_merge
from cellmask.data.semi.views import _scale_range

_VIEW_KEYS = {"hflip", "vflip", "scale", "shift", "fill"}


DEFAULT_SEMI_DATA: dict[str, Any] = {
    "unlabeled_dir": None,
    "ratio": [1, 1],
    "epoch_length": None,
    "crop": None,
    "weak": {"hflip": 0.5, "vflip": 0.5, "scale": [0.8, 1.0], "shift": 0.0, "fill": 0},
    "strong": {
        "hflip": 0.5,
        "vflip": 0.5,
        "scale": [0.8, 1.2],
        "shift": 0.1,
        "fill": 0,
        "brightness_contrast": {"p": 0.8, "brightness": 0.3, "contrast": 0.3},
        "gaussian_blur": {"p": 0.5, "kernel": 5, "sigma": [0.1, 2.0]},
        "erase": {"p": 0.7, "count": [1, 5], "size": [0.05, 0.2]},
    },
}
"""The data keys of the ``semi:`` section (the model's keys live in ``cellmask.models.soft_teacher``)."""


def semi_data_config(semi_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The data keys of a ``semi:`` section merged over :data:`DEFAULT_SEMI_DATA` (others dropped).

    Raises:
        ValueError: an unknown key inside ``weak``/``strong``/``erase``, a weak view that does
            not keep the whole image on its canvas (largest scale ``s`` and shift ``d`` must
            satisfy ``(1 - s) / 2 >= d``), or a ratio that is not two integers >= 1.
    """
    given = {k: v for k, v in (semi_cfg or {}).items() if k in DEFAULT_SEMI_DATA}
    cfg = deep_merge(DEFAULT_SEMI_DATA, given)
    for view in ("weak", "strong"):
        known = _VIEW_KEYS | (
            {"brightness_contrast", "gaussian_blur", "erase"} if view == "strong" else set()
        )
        unknown = sorted(set(cfg[view]) - known)
        if unknown:
            raise ValueError(f"semi.{view}: unknown key(s) {unknown}; expected {sorted(known)}")
    lo, hi = _scale_range(cfg["weak"].get("scale"))
    shift = float(cfg["weak"].get("shift") or 0.0)
    if (1.0 - hi) / 2.0 < shift - 1e-12:
        raise ValueError(
            f"semi.weak must keep the teacher's view whole (scale <= 1 and shift <= (1 - scale) / 2), "
            f"got scale [{lo}, {hi}] and shift {shift}: the teacher would miss cells at the borders "
            "that the strong view shows"
        )
    erase = cfg["strong"].get("erase") or {}
    unknown = sorted(set(erase) - {"p", "count", "size"})
    if unknown:
        raise ValueError(f"semi.strong.erase: unknown key(s) {unknown}; expected ['count', 'p', 'size']")
    ratio = cfg["ratio"]
    if not isinstance(ratio, Sequence) or len(ratio) != 2 or any(int(r) < 1 for r in ratio):
        raise ValueError(
            f"semi.ratio must be [labeled, unlabeled] images per group, both >= 1, got {ratio!r}"
        )
    cfg["ratio"] = [int(r) for r in ratio]
    return cfg
