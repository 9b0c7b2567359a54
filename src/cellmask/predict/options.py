"""The ``predict`` config section: every number of inference, the paper's values as defaults.

:data:`PREDICT_DEFAULTS` is the one source of the defaults; ``configs/predict.yaml`` states the
same values for users to copy and edit (a test keeps the two equal). :func:`predict_config`
merges a caller's section over the defaults (nested sections such as ``wbf`` merge key by key)
and rejects unknown keys, so a typo never passes silently. :func:`load_predict_config` reads a
YAML file (``cellmask predict --config``) with ``--set predict.x=y`` overrides, and
:func:`save_predict_config` writes the resolved section (plus what was run) next to every
submission.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cellmask.data.classes import CLASSES
from cellmask.errors import DataError
from cellmask.predict.postprocess import DEFAULT_MIN_AREA, DEFAULT_SCORE_THRESHOLDS

__all__ = [
    "PAPER_EXACT",
    "PREDICT_DEFAULTS",
    "config_path_for",
    "load_predict_config",
    "predict_config",
    "predict_output_config",
    "save_predict_config",
]

PREDICT_DEFAULTS: dict[str, Any] = {
    "tta": True,
    "wbf": {"iou_thr": 0.6, "skip_box_thr": 0.01, "conf_type": "avg"},
    "class_vote": True,
    "vote_before_wbf": False,
    "vote_min_score": 0.25,
    "score_thresholds": dict(DEFAULT_SCORE_THRESHOLDS),
    "mask_threshold": None,
    "rescore": False,
    "min_area": dict(DEFAULT_MIN_AREA),
    "batch_size": {"images": 8, "detector": 2, "segmenter": None},
    "device": None,
    "amp": None,
}
"""Inference options (the ``predict`` section):

- ``tta``: horizontal-flip test-time augmentation of every branch (paper: on);
- ``wbf``: :func:`ensemble_boxes.weighted_boxes_fusion` arguments (paper: ``iou_thr`` 0.6,
  ``skip_box_thr`` 0.01; ``conf_type`` ``avg``, the library's default);
- ``class_vote``: every instance of an image gets the image's class by a score-weighted vote
  (:func:`~cellmask.predict.single.image_class`) before thresholds and minimum areas apply; not
  in the paper (there every box keeps its own class and threshold);
- ``vote_before_wbf``: with ``class_vote``, vote over every branch's and view's detections and
  relabel them *before* WBF, so WBF merges boxes that two branches labelled differently (after
  WBF, the default, WBF clusters each label on its own and the vote relabels the fused boxes);
- ``vote_min_score``: detections scoring at least this vote (all vote when none does);
- ``score_thresholds``: per-class score thresholds on the fused detections (paper: shsy5y 0.25,
  cort 0.55, astro 0.35), or one float for every class;
- ``mask_threshold``: the segmenter's probability threshold (``None``: the segmenter run's
  ``model.predict.threshold``, 0.5);
- ``rescore``: instance score = box score x mean mask probability inside the mask (orders the
  overlap removal; off in the paper);
- ``min_area``: per-class minimum instance area in pixels after overlap removal, or one int (not
  in the paper: 0 there); the defaults are near the 1st percentile of real cell areas
  (:data:`cellmask.predict.postprocess.DEFAULT_MIN_AREA`);
- ``batch_size``: ``images`` read and detected per chunk (every branch runs on the chunk before
  the next branch), ``detector`` images (TTA views included) per detector forward,
  ``segmenter`` crops per segmenter forward (``None``: the segmenter run's own);
- ``device``: ``cpu``/``cuda`` (``None``: CUDA when available);
- ``amp``: autocast the forwards (``None``: on with CUDA, off on the CPU).
"""

PAPER_EXACT: dict[str, Any] = {"class_vote": False, "min_area": 0, "rescore": False, "tta": True}
"""Overrides that make the pipeline the paper's: every box keeps its own class and threshold,
no minimum area, no re-scoring, flip TTA."""

_NESTED = ("wbf", "batch_size")
_CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    from cellmask.config import deep_merge

    return deep_merge(base, override)


def predict_config(cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`PREDICT_DEFAULTS` overridden by ``cfg`` (a ``predict`` section, or a full config
    holding one under ``"predict"``); mappings merge key by key, other values replace.

    Raises:
        DataError (a ValueError): an unknown key (also inside ``wbf``/``batch_size``), an unknown
            class name, or a value out of range; the message names the key.
    """
    cfg = dict(cfg or {})
    if isinstance(cfg.get("predict"), Mapping):
        cfg = dict(cfg["predict"])
    unknown = sorted(set(cfg) - set(PREDICT_DEFAULTS))
    if unknown:
        raise DataError(f"unknown predict option(s) {unknown}; known: {sorted(PREDICT_DEFAULTS)}")
    for key in _NESTED:
        if key in cfg and not isinstance(cfg[key], Mapping):
            raise DataError(f"predict.{key} must be a mapping, got {cfg[key]!r}")
        extra = sorted(set(cfg.get(key) or {}) - set(PREDICT_DEFAULTS[key]))
        if extra:
            raise DataError(
                f"unknown predict.{key} option(s) {extra}; known: {sorted(PREDICT_DEFAULTS[key])}"
            )
    out = _merge(copy.deepcopy(PREDICT_DEFAULTS), cfg)
    _validate(out)
    return out


def _validate(opts: Mapping[str, Any]) -> None:
    for key in ("score_thresholds", "min_area"):
        value = opts[key]
        if isinstance(value, Mapping):
            bad = [k for k in value if k not in CLASSES]
            if bad:
                raise DataError(
                    f"predict.{key}: unknown class name(s) {bad}; expected some of {list(CLASSES)}"
                )
    wbf = opts["wbf"]
    if not 0.0 < float(wbf["iou_thr"]) <= 1.0:
        raise DataError(f"predict.wbf.iou_thr must be in (0, 1], got {wbf['iou_thr']}")
    if wbf["conf_type"] not in _CONF_TYPES:
        raise DataError(f"predict.wbf.conf_type must be one of {_CONF_TYPES}, got {wbf['conf_type']!r}")
    if opts["device"] not in (None, "cpu", "cuda") and not str(opts["device"]).startswith("cuda:"):
        raise DataError(f"predict.device must be cpu, cuda or null, got {opts['device']!r}")
    for key, value in opts["batch_size"].items():
        if value is not None and int(value) < 1:
            raise DataError(f"predict.batch_size.{key} must be >= 1 or null, got {value}")


def load_predict_config(
    config: str | Path | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> dict[str, Any]:
    """The resolved ``predict`` section of a YAML file or a mapping, with overrides.

    Args:
        config: a YAML file holding a ``predict:`` section (``configs/predict.yaml``, a file
            ``cellmask tune`` wrote, or the ``*.predict.yaml`` beside a submission; ``_base_``
            is resolved), or a mapping (a ``predict`` section or a config holding one);
            ``None``: the defaults.
        overrides: ``["predict.tta=false", ...]`` (``cellmask ... --set``) or a nested mapping
            ``{"predict": {...}}``, applied last.

    Raises:
        FileNotFoundError: no such file. DataError: see :func:`predict_config`; an unreadable
        file, or a malformed override or one outside ``predict.``.
    """
    from cellmask.config import load_config, parse_overrides

    if config is None:
        section: Mapping[str, Any] = {}
    elif isinstance(config, Mapping):
        section = config["predict"] if isinstance(config.get("predict"), Mapping) else config
    else:
        try:
            loaded = load_config(config)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        section = loaded.get("predict") or {}
        if not isinstance(section, Mapping):
            raise DataError(f"{config}: 'predict' must be a mapping")
    cfg: dict[str, Any] = {"predict": dict(section)}
    if overrides:
        if not isinstance(overrides, Mapping):
            items = list(overrides)
            bad = [o for o in items if not o.strip().startswith("predict.")]
            if bad:
                raise DataError(f"--set {bad[0]!r}: predict overrides start with 'predict.'")
            try:
                overrides = parse_overrides(items)
            except ValueError as exc:
                raise DataError(str(exc)) from None
        cfg = _merge(cfg, overrides)
    return predict_config(cfg["predict"])


def predict_output_config(opts: Mapping[str, Any], runs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"predict": opts, "runs": runs}``: what :func:`save_predict_config` writes. ``device`` is
    written as ``null``: it belongs to the machine, not to the pipeline (a config tuned on a CPU
    must not pin a Kaggle GPU run to the CPU)."""
    out: dict[str, Any] = {"predict": {**copy.deepcopy(dict(opts)), "device": None}}
    if runs:
        out["runs"] = copy.deepcopy(dict(runs))
    return out


def save_predict_config(
    opts: Mapping[str, Any], path: str | Path, runs: Mapping[str, Any] | None = None
) -> Path:
    """Write the resolved ``predict`` section (and the runs used) as YAML; returns the path.

    ``cellmask predict --config PATH`` reads it back (only its ``predict`` section counts)."""
    from cellmask.config import save_config

    return save_config(predict_output_config(opts, runs), path)


def config_path_for(submission: str | Path) -> Path:
    """``submission.csv`` -> ``submission.predict.yaml`` (the resolved config beside it)."""
    submission = Path(submission)
    return submission.with_name(submission.stem + ".predict.yaml")
