"""The data keys of the ``semi:`` section, their defaults (:data:`DEFAULT_SEMI_DATA`: [22]'s
default pipelines, the paper profile) and the smaller views of the cpu/demo/smoke profiles
(:data:`COMPACT_VIEWS`)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from cellmask.config import deep_merge
from cellmask.data.semi.pipelines import GEOMETRIC_OPS
from cellmask.data.semi.randaug import COLOR_OPS, check_color
from cellmask.data.semi.views import _scale_range

_COMMON_KEYS = {"hflip", "vflip", "rand_resize", "fill"}
_VIEW_KEYS = {
    "labeled": _COMMON_KEYS | {"color"},
    "weak": _COMMON_KEYS | {"scale", "shift", "max_scale"},
    "strong": _COMMON_KEYS
    | {"scale", "shift", "color", "geometric", "brightness_contrast", "gaussian_blur", "erase"},
}
_ERASE_KEYS = {"p", "count", "size", "shape"}
_GEOMETRIC_KEYS = {"ops", "translate", "rotate", "shear"}


def _reference_views() -> dict[str, Any]:
    """[22]'s default pipelines (``configs/soft_teacher/base.py``), adapted (see the package doc)."""
    rand_resize = {"img_scale": [[1333, 400], [1333, 1200]], "test_scale": [1333, 800]}
    color = {"ops": list(COLOR_OPS), "magnitude": [1, 9]}
    return {
        "labeled": {"hflip": 0.5, "vflip": 0.0, "rand_resize": rand_resize, "color": color, "fill": 125},
        "weak": {
            "hflip": 0.5,
            "vflip": 0.0,
            "scale": None,
            "shift": 0.0,
            "rand_resize": copy.deepcopy(rand_resize),
            "max_scale": 1.0,
            "fill": 125,
        },
        "strong": {
            "hflip": 0.5,
            "vflip": 0.0,
            "scale": None,
            "shift": 0.0,
            "rand_resize": copy.deepcopy(rand_resize),
            "fill": 125,
            "color": copy.deepcopy(color),
            "geometric": {
                "ops": list(GEOMETRIC_OPS),
                "translate": [-0.1, 0.1],
                "rotate": [-30, 30],
                "shear": [-30, 30],
            },
            "brightness_contrast": None,
            "gaussian_blur": None,
            "erase": {"p": 1.0, "count": [1, 4], "size": [0.0, 0.2], "shape": "image"},
        },
    }


DEFAULT_SEMI_DATA: dict[str, Any] = {
    "unlabeled_dir": None,
    "ratio": [1, 1],
    "epoch_length": None,
    "crop": None,
    **_reference_views(),
}
"""The data keys of the ``semi:`` section, as the paper profile of
``configs/soft_teacher_resnext101.yaml`` states them (the model's keys live in
``cellmask.models.soft_teacher``)."""

COMPACT_VIEWS: dict[str, Any] = {
    "labeled": None,
    "weak": {
        "hflip": 0.5,
        "vflip": 0.5,
        "scale": [0.8, 1.0],
        "shift": 0.0,
        "rand_resize": None,
        "max_scale": None,
        "fill": 0,
    },
    "strong": {
        "hflip": 0.5,
        "vflip": 0.5,
        "scale": [0.8, 1.2],
        "shift": 0.1,
        "rand_resize": None,
        "fill": 0,
        "color": None,
        "geometric": None,
        "brightness_contrast": {"p": 0.8, "brightness": 0.3, "contrast": 0.3},
        "gaussian_blur": {"p": 0.5, "kernel": 5, "sigma": [0.1, 2.0]},
        "erase": {"p": 0.7, "count": [1, 5], "size": [0.05, 0.2], "shape": "square"},
    },
}
"""The smaller views of the cpu/demo/smoke profiles (vertical flips, scale jitter, shift,
brightness/contrast, blur, square cutout; labeled images take ``augment:``)."""


def _pair(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, Sequence) or len(value) != 2 or float(value[0]) > float(value[1]):
        raise ValueError(f"{where} must be [lo, hi] with lo <= hi, got {value!r}")
    return float(value[0]), float(value[1])


def _check_rand_resize(value: Any, where: str) -> None:
    ok = isinstance(value, Mapping) and set(value) == {"img_scale", "test_scale"}
    if ok:
        scales = [*value["img_scale"], value["test_scale"]]
        ok = len(value["img_scale"]) == 2 and all(
            isinstance(s, Sequence) and len(s) == 2 and all(int(v) > 0 for v in s) for s in scales
        )
    if not ok:
        raise ValueError(
            f"{where}.rand_resize must be null or {{img_scale: [[long, short], [long, short]], "
            f"test_scale: [long, short]}} with positive sizes, got {value!r}"
        )


def _check_view(view: str, cfg: Any) -> None:
    where = f"semi.{view}"
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where} must be a mapping, got {cfg!r}")
    unknown = sorted(set(cfg) - _VIEW_KEYS[view])
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected {sorted(_VIEW_KEYS[view])}")
    if cfg.get("rand_resize") is not None:
        _check_rand_resize(cfg["rand_resize"], where)
        if cfg.get("scale") is not None or float(cfg.get("shift") or 0.0) != 0.0:
            raise ValueError(
                f"{where}: rand_resize places the scaled image itself; set scale: null and shift: 0 "
                f"(or rand_resize: null for the scale/shift jitter), got scale {cfg.get('scale')!r}, "
                f"shift {cfg.get('shift')!r}"
            )
    check_color(cfg.get("color"), where)
    geometric = cfg.get("geometric")
    if geometric is not None:
        if not isinstance(geometric, Mapping) or set(geometric) != _GEOMETRIC_KEYS:
            raise ValueError(f"{where}.geometric must be null or a mapping of {sorted(_GEOMETRIC_KEYS)}")
        ops = list(geometric["ops"] or [])
        if not ops or set(ops) - set(GEOMETRIC_OPS):
            raise ValueError(f"{where}.geometric.ops: got {ops!r}; expected some of {list(GEOMETRIC_OPS)}")
        for key in ("translate", "rotate", "shear"):
            _pair(geometric[key], f"{where}.geometric.{key}")
    erase = cfg.get("erase")
    if erase:
        unknown = sorted(set(erase) - _ERASE_KEYS)
        if unknown:
            raise ValueError(f"{where}.erase: unknown key(s) {unknown}; expected {sorted(_ERASE_KEYS)}")
        if erase.get("shape", "square") not in ("square", "image"):
            raise ValueError(f"{where}.erase.shape must be 'square' or 'image', got {erase['shape']!r}")
        lo, _ = _pair(erase.get("count", [1, 1]), f"{where}.erase.count")
        if lo < 0:
            raise ValueError(f"{where}.erase.count must be >= 0, got {erase['count']!r}")


def _check_weak_is_whole(weak: Mapping[str, Any]) -> None:
    """The teacher's view keeps the whole image on its canvas (see the package doc)."""
    max_scale = weak.get("max_scale")
    if weak.get("rand_resize") is not None:
        if max_scale is None or float(max_scale) > 1.0:
            raise ValueError(
                "semi.weak must keep the teacher's view whole: with rand_resize, max_scale must be "
                f"<= 1 (a larger drawn scale is clamped to it), got {max_scale!r}"
            )
        return
    lo, hi = _scale_range(weak.get("scale"))
    if max_scale is not None:
        hi = min(hi, float(max_scale))
    shift = float(weak.get("shift") or 0.0)
    if (1.0 - hi) / 2.0 < shift - 1e-12:
        raise ValueError(
            f"semi.weak must keep the teacher's view whole (scale <= 1 and shift <= (1 - scale) / 2), "
            f"got scale [{lo}, {hi}] and shift {shift}: the teacher would miss cells at the borders "
            "that the strong view shows"
        )


def semi_data_config(semi_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The data keys of a ``semi:`` section merged over :data:`DEFAULT_SEMI_DATA` (others dropped).

    Raises:
        ValueError: an unknown key inside ``labeled``/``weak``/``strong`` or their ``erase``,
            ``color``, ``geometric``, ``rand_resize``; ``rand_resize`` together with ``scale`` or
            ``shift``; a weak view that does not keep the whole image on its canvas (with
            ``rand_resize``: ``max_scale <= 1``; else largest scale ``s`` and shift ``d`` with
            ``(1 - s) / 2 >= d``); or a ratio that is not two integers >= 1.
    """
    given = {k: v for k, v in (semi_cfg or {}).items() if k in DEFAULT_SEMI_DATA}
    cfg = deep_merge(DEFAULT_SEMI_DATA, given)
    for view in ("labeled", "weak", "strong"):
        if cfg[view] is not None or view != "labeled":
            _check_view(view, cfg[view])
    _check_weak_is_whole(cfg["weak"])
    ratio = cfg["ratio"]
    if not isinstance(ratio, Sequence) or len(ratio) != 2 or any(int(r) < 1 for r in ratio):
        raise ValueError(
            f"semi.ratio must be [labeled, unlabeled] images per group, both >= 1, got {ratio!r}"
        )
    cfg["ratio"] = [int(r) for r in ratio]
    return cfg
