"""The weights dataset: each run's ``best.pt`` and resolved ``config.yaml``, and the tuned
predict config, laid out as the inference kernel reads them (``make weights``)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cellmask.errors import DataError
from cellmask.kaggle.packaging import DATASETS_DIR, WEIGHTS, write_json


def run_config(run: str | Path) -> dict[str, Any]:
    """The resolved ``config.yaml`` of a run directory (``best.pt`` must be beside it).

    Raises:
        FileNotFoundError: no such directory, ``best.pt`` or ``config.yaml`` (naming the path).
        DataError: a config without a ``model.type``.
    """
    run = Path(run)
    for name in ("best.pt", "config.yaml"):
        if not (run / name).is_file():
            raise FileNotFoundError(
                f"{run / name}: no such file (is {run} a `cellmask train` run directory?)"
            )
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or "type" not in cfg["model"]:
        raise DataError(f"{run / 'config.yaml'}: has no model.type")
    return cfg


def discover_runs(runs_root: str | Path) -> tuple[list[Path], Path | None]:
    """``(detector runs, the segmenter run)`` among the run directories right under
    ``runs_root`` (each with ``best.pt`` and ``config.yaml``), sorted by name.

    Raises:
        DataError: more than one segmenter run (say which with ``--segmenter``).
    """
    runs = sorted(p.parent for p in Path(runs_root).glob("*/best.pt") if (p.parent / "config.yaml").is_file())
    segmenters = [r for r in runs if run_config(r)["model"]["type"] == "segmenter"]
    if len(segmenters) > 1:
        raise DataError(f"{runs_root}: several segmenter runs ({', '.join(map(str, segmenters))}); pick one")
    return [r for r in runs if r not in segmenters], (segmenters[0] if segmenters else None)


def run_statuses(runs: Sequence[str | Path], accept_unfinished: bool = False) -> dict[str, Any]:
    """Each run's :class:`~cellmask.engine.status.RunStatus` (``status.json``, or derived from
    ``config.yaml`` + ``metrics.csv`` for older runs), keyed by the run's path.

    Raises:
        DataError: a run did not finish (cut by ``max_hours`` and never continued, or fewer epochs
            than planned) and ``accept_unfinished`` is not set; the message names every such run
            with its epochs done / planned. A run whose status cannot be told counts as unfinished.
    """
    from cellmask.engine.status import read_status

    statuses, unfinished = {}, []
    for run in runs:
        try:
            status = read_status(run)
        except FileNotFoundError as exc:
            statuses[str(run)] = None
            unfinished.append(f"{run} (cannot tell: {exc})")
            continue
        statuses[str(run)] = status
        if not status.finished:
            unfinished.append(f"{run} ({status.describe()})")
    if unfinished and not accept_unfinished:
        raise DataError(
            "only finished runs ship: " + "; ".join(unfinished) + ". Continue them (make push-train ... "
            "RESUME_FROM=<owner/slug/N>), or pack them anyway with ACCEPT_UNFINISHED=1 (--accept-unfinished)"
        )
    return statuses


def _copy_run(run: Path, dst: Path, cfg: Mapping[str, Any], status: Any = None) -> dict[str, Any]:
    dst.mkdir(parents=True)
    for name in ("best.pt", "config.yaml"):
        shutil.copy2(run / name, dst / name)
    return {
        "status": None if status is None else {**vars(status), "describe": status.describe()},
        "source": str(run),
        "type": cfg["model"]["type"],
        "backbone": (cfg["model"].get("backbone") or {}).get("name"),
        "profile": cfg.get("profile"),
        "ensemble_weight": (cfg.get("ensemble") or {}).get("weight"),
        "bytes": (dst / "best.pt").stat().st_size,
    }


TYPE_CLASSIFIER = "type_classifier"
"""Where the image-type classifier a predict config names goes in the weights dataset."""


def _copy_predict_config(path: Path, out: Path) -> dict[str, Any] | None:
    """``out/predict.yaml`` from ``path``; an image-type classifier it names
    (``predict.type_classifier``, :mod:`cellmask.models.image_type`) is copied to
    ``out/type_classifier/`` and named relative to the file, so the offline kernel finds it."""
    from cellmask.predict.options import load_predict_config

    raw = yaml.safe_load(path.read_text()) or {}
    classifier = load_predict_config(path).get("type_classifier")
    if not classifier:
        shutil.copy2(path, out / "predict.yaml")
        return None
    cfg = run_config(classifier)
    entry = _copy_run(Path(classifier), out / TYPE_CLASSIFIER, cfg)
    raw.setdefault("predict", {})["type_classifier"] = TYPE_CLASSIFIER
    (out / "predict.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return entry


def collect_weights(
    branches: Sequence[str | Path],
    segmenter: str | Path,
    predict_config: str | Path | None = None,
    out: str | Path = Path(DATASETS_DIR) / WEIGHTS,
    accept_unfinished: bool = False,
) -> dict[str, Any]:
    """Fill the weights dataset, laid out as the inference kernel reads it::

        out/branches/<run name>/{best.pt, config.yaml}   one per detector branch
        out/segmenter/{best.pt, config.yaml}
        out/predict.yaml                                  the tuned predict config (if given)
        out/type_classifier/{best.pt, config.yaml}        the image-type classifier it names (if any)
        out/manifest.json                                 what came from where

    Earlier contents are replaced (``dataset-metadata.json`` stays).

    Returns:
        the manifest.

    Raises:
        FileNotFoundError: a run without ``best.pt``/``config.yaml``, or no predict config file.
        DataError: no branch, a segmenter given as a branch (or the reverse), two branches of
            the same run name, a run that did not finish (unless ``accept_unfinished``:
            :func:`run_statuses`).
    """
    out = Path(out)
    if not branches:
        raise DataError("no detector run given (--runs)")
    names = [Path(b).name for b in branches]
    if len(set(names)) != len(names):
        raise DataError(f"two branch runs share a directory name: {names}")
    cfgs = [run_config(b) for b in branches]
    for run, cfg in zip(branches, cfgs, strict=True):
        if cfg["model"]["type"] == "segmenter":
            raise DataError(f"{run}: is a segmenter run, given as a detector branch")
    seg_cfg = run_config(segmenter)
    if seg_cfg["model"]["type"] != "segmenter":
        raise DataError(f"{segmenter}: is a {seg_cfg['model']['type']} run, given as the segmenter")
    if predict_config is not None and not Path(predict_config).is_file():
        raise FileNotFoundError(f"{predict_config}: no such predict config")
    statuses = run_statuses([*branches, segmenter], accept_unfinished)

    for stale in (out / "branches", out / "segmenter", out / TYPE_CLASSIFIER):
        if stale.exists():
            shutil.rmtree(stale)
    for stale in (out / "predict.yaml", out / "manifest.json"):
        stale.unlink(missing_ok=True)
    manifest: dict[str, Any] = {"branches": {}, "segmenter": None, "predict_config": None}
    for run, name, cfg in zip(branches, names, cfgs, strict=True):
        manifest["branches"][name] = _copy_run(Path(run), out / "branches" / name, cfg, statuses[str(run)])
    manifest["segmenter"] = _copy_run(Path(segmenter), out / "segmenter", seg_cfg, statuses[str(segmenter)])
    if predict_config is not None:
        manifest["predict_config"] = str(predict_config)
        manifest["type_classifier"] = _copy_predict_config(Path(predict_config), out)
    write_json(out / "manifest.json", manifest)
    return manifest
