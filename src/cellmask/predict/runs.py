"""Models from training runs: which checkpoint, which config, which kind, which WBF weight.

A *run* is what ``cellmask train --out DIR`` leaves: ``DIR/config.yaml`` (the resolved config)
beside ``best.pt``, ``last.pt`` and ``epoch_XXX.pt``. Users name runs, not flags per branch:
:func:`resolve_run` takes a run directory or a checkpoint path and finds

- the checkpoint: ``best.pt`` (the best validation epoch), else ``last.pt`` (the run never
  validated, or was stopped before its first validation), else the newest ``epoch_XXX.pt``;
  :attr:`RunSpec.reason` says which and why;
- the config: the run's ``config.yaml`` (contract 6: inference reads the branch kind and its
  ``ensemble.weight`` from it; an inference-time edit such as ``model.roi.score_thresh`` is
  honoured), else the config embedded in the checkpoint.

:func:`load_run_model` rebuilds the model with ``pretrained`` off (the checkpoint holds every
weight, nothing is downloaded), loads it with ``torch.load(..., weights_only=True)``
(:func:`cellmask.engine.load_checkpoint`) and, where the model defines ``inference_model()``
(contract 5: Soft Teacher), returns what that gives. Every failure is one error naming the file:
a missing run or checkpoint (``FileNotFoundError``), an unreadable checkpoint, weights that do
not fit the config, a run of the wrong kind (``CheckpointError``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from cellmask.data.classes import CLASSES

__all__ = [
    "MODEL_NAMES",
    "Branch",
    "RunSpec",
    "load_branches",
    "load_detector",
    "load_run_model",
    "load_segmenter",
    "model_name",
    "resolve_run",
]

log = logging.getLogger("cellmask.predict")

MODEL_NAMES = {
    "faster_rcnn": "Faster R-CNN",
    "cascade_rcnn": "Cascade R-CNN",
    "cascade_mask_rcnn": "Cascade Mask R-CNN",
    "soft_teacher": "Soft Teacher",
    "segmenter": "UperNet",
    "swin_tiny_patch4_window7_224": "Swin-T",
    "resnext101_32x4d": "ResNeXt-101",
    "resnest101e": "ResNeSt-101",
}
"""Display names of model types and backbones (``"Faster R-CNN Swin-T"``)."""

_EPOCH = re.compile(r"^epoch_(\d+)\.pt$")


def model_name(cfg: Mapping[str, Any]) -> str:
    """``"<type> <backbone>"`` in words, from a full config's ``model`` section."""
    model = cfg.get("model") or {}
    kind = str(model.get("type", "?"))
    backbone = str((model.get("backbone") or {}).get("name", "")).partition(".")[0]  # no timm tag
    return f"{MODEL_NAMES.get(kind, kind)} {MODEL_NAMES.get(backbone, backbone)}".strip()


@dataclass(frozen=True)
class RunSpec:
    """A resolved run: the checkpoint to load and the config that describes it.

    Attributes:
        source: what the caller gave (a run directory or a checkpoint file).
        checkpoint: the checkpoint file chosen.
        reason: why that file (``"best.pt: the best validation epoch"``, ...).
        config: the resolved training config (``model``, ``data``, ``ensemble``, ...).
        config_file: the ``config.yaml`` read, or ``None`` when the checkpoint's embedded
            config was used.
    """

    source: Path
    checkpoint: Path
    reason: str
    config: dict[str, Any]
    config_file: Path | None

    @property
    def kind(self) -> str:
        """``model.type``: ``faster_rcnn``, ``cascade_rcnn``, ..., ``segmenter``."""
        return str((self.config.get("model") or {}).get("type"))

    @property
    def name(self) -> str:
        """Display name from the model type and backbone (``"Cascade R-CNN ResNeXt-101"``)."""
        return model_name(self.config)

    @property
    def weight(self) -> float:
        """The branch's WBF weight: ``ensemble.weight`` of its config (contract 6), 1 when absent."""
        value = (self.config.get("ensemble") or {}).get("weight", 1)
        return float(1 if value is None else value)

    def fingerprint(self) -> str:
        """A short hash of the checkpoint file (resolved path, size, mtime) and the model config:
        a retrained or edited run gets a new one (the detection cache's key)."""
        stat = self.checkpoint.stat()
        blob = json.dumps(
            [str(self.checkpoint.resolve()), stat.st_size, stat.st_mtime_ns, self.config.get("model")],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def describe(self) -> dict[str, Any]:
        """What a submission's ``*.predict.yaml`` records about this run."""
        return {
            "name": self.name,
            "type": self.kind,
            "weight": self.weight,
            "checkpoint": str(self.checkpoint),
            "why": self.reason,
            "config": str(self.config_file) if self.config_file else "embedded in the checkpoint",
        }


def _choose_checkpoint(run_dir: Path) -> tuple[Path, str]:
    best, last = run_dir / "best.pt", run_dir / "last.pt"
    if best.is_file():
        return best, "best.pt: the best validation epoch"
    epochs = sorted((int(m.group(1)), p) for p in run_dir.glob("epoch_*.pt") if (m := _EPOCH.match(p.name)))
    if last.is_file():
        return last, "last.pt: no best.pt (the run never validated), so its latest state"
    if epochs:
        return epochs[-1][1], f"{epochs[-1][1].name}: no best.pt or last.pt, so the newest epoch"
    raise FileNotFoundError(
        f"{run_dir}: no checkpoint in this run directory (looked for best.pt, last.pt, epoch_XXX.pt)"
    )


def resolve_run(path: str | Path) -> RunSpec:
    """Find a run's checkpoint and config (see the module docstring).

    Args:
        path: a run directory, or a checkpoint file (its folder's ``config.yaml`` is used when
            there is one, else the config inside the checkpoint).

    Raises:
        FileNotFoundError: no such directory/file, or a run directory without a checkpoint.
        CheckpointError: the checkpoint is unreadable or holds no config with a model section.
    """
    from cellmask.engine import CheckpointError, load_checkpoint

    source = Path(path)
    if source.is_dir():
        checkpoint, reason = _choose_checkpoint(source)
    elif source.is_file():
        checkpoint, reason = source, "the checkpoint given"
    else:
        raise FileNotFoundError(f"{source}: no such run directory or checkpoint")
    config_file = checkpoint.parent / "config.yaml"
    if config_file.is_file():  # the resolved config `cellmask train` saved (no _base_ left)
        try:
            cfg = yaml.safe_load(config_file.read_text())
        except yaml.YAMLError as exc:
            raise CheckpointError(f"{config_file}: unreadable run config ({exc})") from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), Mapping):
            raise CheckpointError(f"{config_file}: a run config needs a model section")
        return RunSpec(source, checkpoint, reason, cfg, config_file)
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.get("config")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model"), Mapping):
        raise CheckpointError(
            f"{checkpoint}: holds no config with a model section and has no config.yaml beside it "
            "(written by `cellmask train`?)"
        )
    return RunSpec(source, checkpoint, reason, dict(cfg), None)


def _offline(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``model_cfg`` with ImageNet weights off (the checkpoint holds every weight)."""
    cfg = copy.deepcopy(dict(model_cfg))
    backbone = dict(cfg.get("backbone") or {})
    backbone["pretrained"] = False
    backbone.pop("weights_file", None)
    cfg["backbone"] = backbone
    return cfg


def _check_kind(spec: RunSpec, expect: str) -> None:
    from cellmask.engine import CheckpointError

    is_segmenter = spec.kind == "segmenter"
    if (expect == "image_type") != (spec.kind == "image_type"):
        if expect == "image_type":
            raise CheckpointError(f"{spec.source}: is a {spec.kind} run, expected an image-type classifier")
        raise CheckpointError(
            f"{spec.source}: is an image-type classifier run, expected a {expect}: give it as "
            "predict.type_classifier"
        )
    if expect == "segmenter" and not is_segmenter:
        raise CheckpointError(
            f"{spec.source}: is a {spec.kind} run ({spec.name}), expected a segmenter: "
            "give detector runs as branches (--runs) and the segmenter run as --segmenter"
        )
    if expect == "detector":
        if is_segmenter:
            raise CheckpointError(
                f"{spec.source}: is a segmenter checkpoint (model.type segmenter), expected a detector: "
                "give it as --segmenter, not as a branch"
            )
        data = spec.config.get("data") or {}
        num_classes = int(data.get("num_classes", len(CLASSES) + 1))
        if num_classes != len(CLASSES) + 1:
            raise CheckpointError(
                f"{spec.source}: was trained on {data.get('dataset', 'another dataset')} with "
                f"{num_classes - 1} classes; the ensemble needs competition runs ({len(CLASSES)} classes: "
                f"fine-tune it with --dataset sartorius --init {spec.checkpoint})"
            )


def _load_weights(model: torch.nn.Module, spec: RunSpec, state: Mapping[str, torch.Tensor]) -> None:
    from cellmask.engine import CheckpointError

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        where = spec.config_file or "the config inside it"
        examples = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in shapes[:2]
        ]
        examples += [f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in unexpected[:2]]
        raise CheckpointError(
            f"{spec.checkpoint}: its weights do not fit the model that {where} describes "
            f"({spec.name}): {len(shapes)} shape mismatch(es), {len(missing)} missing and "
            f"{len(unexpected)} unexpected key(s), e.g. {'; '.join(examples)}"
        )
    model.load_state_dict(state)


def load_run_model(spec: RunSpec, expect: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild and load the model of a resolved run, in eval mode on ``device``.

    Args:
        spec: from :func:`resolve_run`.
        expect: ``"detector"`` (a branch; a model with ``inference_model()`` is replaced by what
            it returns) or ``"segmenter"``.

    Raises:
        CheckpointError: a run of the other kind, a non-competition detector, an unreadable
            checkpoint, or weights that do not fit the config (names both files).
    """
    from cellmask.engine import checkpoint_state_dict, load_checkpoint

    if expect not in ("detector", "segmenter", "image_type"):
        raise ValueError(f"expect must be 'detector', 'segmenter' or 'image_type', got {expect!r}")
    _check_kind(spec, expect)
    state = checkpoint_state_dict(load_checkpoint(spec.checkpoint, map_location="cpu"), spec.checkpoint)
    if expect == "image_type":
        from cellmask.models.image_type import build_image_classifier

        num_classes = int((spec.config.get("data") or {}).get("num_classes", len(CLASSES) + 1))
        model = build_image_classifier(spec.config["model"], num_classes)
    elif expect == "segmenter":
        from cellmask.models.segmenter import build_segmenter

        model = build_segmenter(_offline(spec.config["model"]))
    else:
        from cellmask.models import build_detector

        num_classes = int((spec.config.get("data") or {}).get("num_classes", len(CLASSES) + 1))
        model = build_detector(_offline(spec.config["model"]), num_classes=num_classes)
    _load_weights(model, spec, state)
    if expect == "detector" and callable(getattr(model, "inference_model", None)):
        model = model.inference_model()
    return model.to(device).eval()


def _load(path: str | Path, expect: str, device: str | torch.device) -> tuple[torch.nn.Module, dict]:
    spec = resolve_run(path)
    return load_run_model(spec, expect, device), spec.config


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """``(detector in eval mode on device, its run's config)`` from a run directory or checkpoint
    (:func:`resolve_run`, :func:`load_run_model`; errors name the file)."""
    return _load(path, "detector", device)


def load_type_classifier(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict]:
    """``(image-type classifier in eval mode on device, its run's config)`` from a run directory
    or checkpoint (``predict.type_classifier``)."""
    return _load(path, "image_type", device)


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """``(segmenter in eval mode on device, its run's config)`` from a run directory or checkpoint
    (:func:`resolve_run`, :func:`load_run_model`; errors name the file)."""
    return _load(path, "segmenter", device)


@dataclass
class Branch:
    """One detector of the ensemble.

    Attributes:
        name: display name (unique within a predictor), e.g. ``"Faster R-CNN Swin-T"``.
        model: the detector (``GeneralizedRCNN`` convention), eval mode.
        weight: its WBF weight (``ensemble.weight`` of its run's config; paper 2, 3, 3, 1).
        run: the run it was loaded from (``None`` for an in-memory model: never cached).
    """

    name: str
    model: torch.nn.Module
    weight: float = 1.0
    run: RunSpec | None = None


def load_branches(runs: Sequence[RunSpec | str | Path], device: str | torch.device = "cpu") -> list[Branch]:
    """One :class:`Branch` per detector run (a :class:`RunSpec`, directory or checkpoint), in
    order: name, kind and WBF weight from its config; two runs of one model get the run folder in
    their names.

    Raises:
        ValueError: no run. FileNotFoundError, CheckpointError: see :func:`resolve_run` and
        :func:`load_run_model`.
    """
    if not runs:
        raise ValueError("give at least one detector run (--runs)")
    specs = [r if isinstance(r, RunSpec) else resolve_run(r) for r in runs]
    names = [s.name for s in specs]
    out = []
    for name, spec in zip(names, specs, strict=True):
        unique = f"{name} ({spec.source.name})" if names.count(name) > 1 else name
        out.append(Branch(unique, load_run_model(spec, "detector", device), spec.weight, spec))
        log.info("branch %s: weight %g, %s (%s)", unique, spec.weight, spec.checkpoint, spec.reason)
    return out
