"""The ``predict`` config section: every number of inference, the paper's values as defaults.

:data:`PREDICT_DEFAULTS` is the one source of the defaults; ``configs/predict.yaml`` states the
same values for users to copy and edit (a test keeps the two equal). :func:`predict_config`
merges a caller's section over the defaults (nested sections such as ``wbf`` merge key by key)
and rejects unknown keys, so a typo never passes silently. :func:`load_predict_config` reads a
YAML file (``cellmask predict --config``) with ``--set predict.x=y`` overrides and, with
``paper_exact``, :data:`PAPER_EXACT` on top (``--paper-exact``: the paper's pipeline, section
5.3.2, and nothing else), and :func:`save_predict_config` writes the resolved section (plus
what was run, and whether it is the paper's pipeline) next to every submission.

Precedence, lowest first: the defaults, ``--config``, ``--set``, ``--paper-exact``. The paper's
values replace what a config file says (a warning names each key replaced); a ``--set`` that
gives one of them another value is an error, as the two ask for different pipelines.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cellmask.data.classes import CLASSES
from cellmask.errors import DataError
from cellmask.predict.postprocess import DEFAULT_MIN_AREA, DEFAULT_SCORE_THRESHOLDS

__all__ = [
    "PAPER_EXACT",
    "PAPER_WEIGHTS",
    "PREDICT_DEFAULTS",
    "TTA_FUSIONS",
    "apply_paper_exact",
    "config_path_for",
    "is_paper_exact",
    "load_predict_config",
    "paper_exact_differences",
    "paper_weight_problems",
    "predict_config",
    "predict_output_config",
    "save_predict_config",
]

log = logging.getLogger("cellmask.predict")

TTA_FUSIONS = ("views", "per_model")
"""How flip TTA enters WBF (``predict.tta_fusion``; :func:`cellmask.predict.fusion.fuse_branches`)."""

PREDICT_DEFAULTS: dict[str, Any] = {
    "tta": True,
    "tta_fusion": "per_model",
    "wbf": {"iou_thr": 0.6, "skip_box_thr": 0.01, "conf_type": "avg"},
    "class_vote": True,
    "vote_before_wbf": False,
    "vote_min_score": 0.25,
    "type_classifier": None,
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
- ``tta_fusion``: how the views enter WBF: ``views`` (every (branch, view) pair is one WBF model
  carrying its branch's weight: 8 entries for 4 branches) or ``per_model`` (each branch's views
  merged first, then WBF of the branches, uncapped: the paper's "flip TTA, then WBF of the four
  models"); :mod:`cellmask.predict.fusion` derives where the two differ. The default (and
  ``--paper-exact``'s) is ``per_model``: on the real held-out fold it scored at least as well as
  ``views`` (benchmarks/REAL.md);
- ``wbf``: :func:`ensemble_boxes.weighted_boxes_fusion` arguments (paper: ``iou_thr`` 0.6,
  ``skip_box_thr`` 0.01; ``conf_type`` ``avg``, the library's default);
- ``class_vote``: every instance of an image gets the image's class by a score-weighted vote
  (:func:`~cellmask.predict.single.image_class`) before thresholds and minimum areas apply; not
  in the paper (there every box keeps its own class and threshold);
- ``vote_before_wbf``: with ``class_vote``, vote over every branch's and view's detections and
  relabel them *before* WBF, so WBF merges boxes that two branches labelled differently (after
  WBF, the default, WBF clusters each label on its own and the vote relabels the fused boxes);
- ``vote_min_score``: detections scoring at least this vote (all vote when none does);
- ``type_classifier``: with ``class_vote``, an image-type classifier run
  (:mod:`cellmask.models.image_type`, ``configs/image_type.yaml``) decides the image's type from
  the image instead of the detections' vote (``None``: the vote); a relative path is taken from
  the folder of the predict config that names it; not in the paper;
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
- ``amp``: autocast the forwards (``None``: on with CUDA, off on the CPU), each model in the
  dtype its training used on this GPU (its ``train.amp_dtype``; ``auto``: bfloat16 where the GPU
  has it, else float16).
"""

PAPER_EXACT: dict[str, Any] = {
    "tta": True,
    "tta_fusion": "per_model",
    "wbf": {"iou_thr": 0.6, "skip_box_thr": 0.01, "conf_type": "avg"},
    "class_vote": False,
    "vote_before_wbf": False,
    "type_classifier": None,
    "score_thresholds": dict(DEFAULT_SCORE_THRESHOLDS),
    "mask_threshold": None,
    "rescore": False,
    "min_area": 0,
}
"""The paper's pipeline (MDE-CellMask 5.3.2), the values ``--paper-exact`` puts on top: flip TTA
fused per model, WBF with ``iou_thr`` 0.6 and ``skip_box_thr`` 0.01, every box keeping its own
class and its class's threshold (shsy5y 0.25, cort 0.55, astro 0.35), the segmenter's own mask
threshold, overlap removal with no re-scoring and no minimum area. The branches' WBF weights
come from their runs (:data:`PAPER_WEIGHTS`); ``batch_size``, ``device`` and ``amp`` change
no result and are left as configured, ``vote_min_score`` has no effect without the vote."""

PAPER_WEIGHTS: dict[str, float] = {
    "Faster R-CNN Swin-T": 2.0,
    "Cascade R-CNN ResNeXt-101": 3.0,
    "Cascade R-CNN ResNeSt-101": 3.0,
    "Soft Teacher ResNeXt-101": 1.0,
}
"""The paper's WBF weight of each branch, by its display name (:attr:`RunSpec.name`)."""

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
    if opts["tta_fusion"] not in TTA_FUSIONS:
        raise DataError(f"predict.tta_fusion must be one of {TTA_FUSIONS}, got {opts['tta_fusion']!r}")
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
    paper_exact: bool = False,
) -> dict[str, Any]:
    """The resolved ``predict`` section of a YAML file or a mapping, with overrides.

    Args:
        config: a YAML file holding a ``predict:`` section (``configs/predict.yaml``, a file
            ``cellmask tune`` wrote, or the ``*.predict.yaml`` beside a submission; ``_base_``
            is resolved), or a mapping (a ``predict`` section or a config holding one);
            ``None``: the defaults.
        overrides: ``["predict.tta=false", ...]`` (``cellmask ... --set``) or a nested mapping
            ``{"predict": {...}}``, applied after ``config``.
        paper_exact: apply :data:`PAPER_EXACT` last (``--paper-exact``): its values replace the
            config's (a warning names the keys replaced); an override contradicting one of them
            is an error (:func:`apply_paper_exact`).

    Raises:
        FileNotFoundError: no such file. DataError: see :func:`predict_config`; an unreadable
        file, a malformed override or one outside ``predict.``, or (``paper_exact``) an
        override that contradicts the paper's pipeline.
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
        classifier = section.get("type_classifier")
        if classifier and not Path(classifier).is_absolute():  # beside the file that names it
            section = {**section, "type_classifier": str((Path(config).parent / classifier).resolve())}
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
    opts = predict_config(cfg["predict"])
    if not paper_exact:
        return opts
    replaced = [k for k in paper_exact_differences(predict_config(section)) if k in section]
    if replaced:
        source = config if isinstance(config, str | Path) else "the config"
        log.warning(
            "--paper-exact replaces predict.%s of %s with the paper's values", ", ".join(replaced), source
        )
    overridden = (overrides or {}).get("predict") if isinstance(overrides, Mapping) else None
    return apply_paper_exact(opts, overridden if isinstance(overridden, Mapping) else None)


def apply_paper_exact(opts: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``opts`` with :data:`PAPER_EXACT` on top: each of its keys replaced whole.

    Args:
        opts: a ``predict`` section (resolved or partial).
        overrides: the ``predict`` values a user set explicitly (``--set``); each leaf of it
            must agree with the paper's pipeline.

    Raises:
        DataError: an override giving a key :data:`PAPER_EXACT` fixes another value (it names
            the override and the paper's value).
    """
    for path, value in _leaves(overrides or {}):
        if path[0] not in PAPER_EXACT:
            continue
        paper = _at(PAPER_EXACT, path)
        if not _same(value, paper):
            dotted = "predict." + ".".join(path)
            given = json.dumps(value, default=str)
            raise DataError(
                f"--set {dotted}={given} contradicts --paper-exact, which fixes {dotted} to "
                f"{json.dumps(paper)} (the paper's pipeline, section 5.3.2): drop one of the two"
            )
    return predict_config({**opts, **copy.deepcopy(PAPER_EXACT)})


def paper_exact_differences(opts: Mapping[str, Any]) -> list[str]:
    """The keys of :data:`PAPER_EXACT` whose value in ``opts`` (a resolved section) gives another
    pipeline than the paper's (``min_area: 0`` and ``{shsy5y: 0, cort: 0, astro: 0}`` are the
    same; ``vote_before_wbf`` counts only with the class vote on)."""
    out = []
    for key, paper in PAPER_EXACT.items():
        if key == "vote_before_wbf" and not opts.get("class_vote"):
            continue
        if not _same(opts.get(key, _MISSING), paper):
            out.append(key)
    return out


def is_paper_exact(opts: Mapping[str, Any]) -> bool:
    """Whether a resolved ``predict`` section is the paper's pipeline (``--paper-exact``, or the
    same values set by hand); the runs' WBF weights are checked by :func:`paper_weight_problems`."""
    return not paper_exact_differences(opts)


def paper_weight_problems(weights: Mapping[str, float]) -> list[str]:
    """What makes ``{branch name: WBF weight}`` other than the paper's four branches with their
    weights 2, 3, 3, 1 (:data:`PAPER_WEIGHTS`); empty when it is exactly that."""
    out = [
        f"{name}: WBF weight {w:g}, the paper's is {PAPER_WEIGHTS[name]:g}"
        for name, w in weights.items()
        if name in PAPER_WEIGHTS and not math.isclose(float(w), PAPER_WEIGHTS[name])
    ]
    out += [f"{name}: not one of the paper's branches" for name in weights if name not in PAPER_WEIGHTS]
    out += [f"{name}: missing" for name in PAPER_WEIGHTS if name not in weights]
    return out


_MISSING = object()


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, (*prefix, str(key)))
        else:
            yield (*prefix, str(key)), value


def _at(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path``; a scalar met on the way stands for every key below it (``min_area:
    0`` is 0 for every class)."""
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping):
            break
        node = node.get(part, _MISSING)
    return node


def _same(a: Any, b: Any) -> bool:
    """Equal in effect: numbers within rounding, a scalar equal to every value of a per-class
    mapping, mappings key by key."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not isinstance(a, Mapping):
            a, b = b, a
        if not isinstance(b, Mapping):
            return all(_same(v, b) for v in a.values())
        return all(_same(a.get(k, _MISSING), b.get(k, _MISSING)) for k in set(a) | set(b))
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b or a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def predict_output_config(opts: Mapping[str, Any], runs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"paper_exact": ..., "predict": opts, "runs": runs}``: what :func:`save_predict_config`
    writes. ``paper_exact`` records whether the options are the paper's pipeline
    (:func:`is_paper_exact`: ``--paper-exact``, or the same values by hand); it is a record, not
    an option (``--config`` reads the ``predict`` section only, which holds the same values).
    ``device`` is written as ``null``: it belongs to the machine, not to the pipeline (a config
    tuned on a CPU must not pin a Kaggle GPU run to the CPU)."""
    out: dict[str, Any] = {
        "paper_exact": is_paper_exact(opts),
        "predict": {**copy.deepcopy(dict(opts)), "device": None},
    }
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
