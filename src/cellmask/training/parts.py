"""What a training run trains, by ``model.type``: the model, its training loader and its
validation function (a *parts builder*, :func:`parts_builder`).

A parts builder takes ``(cfg, train_records, val_records, num_classes, info)`` and returns
``(model, train_loader, val_fn)``; ``cfg["data"]["root"]`` holds the data root and
``cfg["run"]["out_dir"]`` the run directory. ``segmenter`` -> :func:`segmenter_parts`,
``soft_teacher`` -> :func:`cellmask.training.soft_teacher.soft_teacher_parts` (imported only then),
anything else -> :func:`detector_parts`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from cellmask.config import get

SOFT_TEACHER_PARTS = "cellmask.training.soft_teacher:soft_teacher_parts"
"""The parts builder of ``model.type: soft_teacher`` (``module:function``, imported on use)."""


SEGMENTER_VAL_WEIGHTS = {"mIoU": "instances", "mIoU_image": "images"}
"""How the ranks' ``evaluate_segmenter`` results combine (:func:`cellmask.engine.merge_means`):
each mean weighted by the count it is a mean over."""


PartsBuilder = Callable[[dict[str, Any], list, list, int, Any], tuple[Any, Any, Any]]


def parts_builder(cfg: dict[str, Any]) -> PartsBuilder:
    """The parts builder of ``cfg``'s ``model.type`` (see the module docstring).

    Raises:
        ImportError: ``soft_teacher`` when its builder cannot be imported (the message names it).
    """
    from cellmask.models.segmenter import is_segmenter_config

    if is_segmenter_config(cfg):
        return segmenter_parts
    kind = (cfg.get("model") or {}).get("type")
    if kind == "image_type":
        return image_type_parts
    if kind == "soft_teacher":
        module, _, name = SOFT_TEACHER_PARTS.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ImportError(
                f"model.type {kind!r} is trained by {SOFT_TEACHER_PARTS}, which cannot be imported: {exc}"
            ) from exc
    return detector_parts


def detector_parts(
    cfg: dict[str, Any], train_records: list, val_records: list, num_classes: int, info: Any
) -> tuple[Any, Any, Any]:
    """``(model, train loader, val_fn)`` of a detector: images with boxes (and masks for mask
    models), COCO box AP on the validation images (each rank detects on its shard of them; the
    detections are gathered before scoring)."""
    from torch.utils.data import Subset

    from cellmask.data.datasets import DetectionDataset, collate
    from cellmask.data.transforms import build_transforms, build_type_transforms
    from cellmask.engine import build_eval_loader, build_train_loader, seed_everything, shard, train_config
    from cellmask.models import build_detector
    from cellmask.training.validation import evaluate_detector

    tcfg = train_config(cfg)
    augment = cfg.get("augment") or {}
    with_masks = bool(get(cfg, "model.mask.enabled", False))
    train_set = DetectionDataset(
        train_records,
        build_transforms(augment, train=True),
        with_masks=with_masks,
        image_cache=bool(tcfg["image_cache"]),
        type_transforms=build_type_transforms(augment, train=True),
    )
    train_loader = build_train_loader(train_set, cfg, collate, info)

    seed_everything(int(tcfg["seed"]))  # the model's initialisation is reproducible
    model = build_detector(cfg["model"], num_classes=num_classes)

    val_fn = None
    if val_records:
        val_set = DetectionDataset(val_records, build_transforms(augment, train=False), with_masks=False)
        val_loader = build_eval_loader(Subset(val_set, shard(range(len(val_set)), info)), cfg, collate)
        amp, amp_dtype = bool(tcfg["amp"]), str(tcfg["amp_dtype"])

        def val_fn(m, epoch, info):
            return evaluate_detector(
                m, val_loader, info.device, num_classes=num_classes, amp=amp, amp_dtype=amp_dtype, info=info
            )

    return model, train_loader, val_fn


def segmenter_parts(
    cfg: dict[str, Any], train_records: list, val_records: list, num_classes: int, info: Any
) -> tuple[Any, Any, Any]:
    """``(model, train loader, val_fn)`` of the segmenter: per-image batches of truth-instance
    crops (:class:`~cellmask.data.crops.CropDataset`, ``crops`` section), validated by the mean
    mask IoU of the validation instances segmented from their truth boxes (``val_mIoU``; each
    rank evaluates its shard of the first ``val.max_images`` images, and the means are merged
    by :data:`SEGMENTER_VAL_WEIGHTS`). The segmenter is class-agnostic: ``num_classes`` is not
    used."""
    from cellmask.data.crops import CropDataset
    from cellmask.data.datasets import collate
    from cellmask.engine import (
        build_train_loader,
        gather_objects,
        merge_means,
        seed_everything,
        shard,
        train_config,
    )
    from cellmask.models.segmenter import build_segmenter, evaluate_segmenter

    tcfg = train_config(cfg)
    seed_everything(int(tcfg["seed"]))  # the model's initialisation is reproducible
    model = build_segmenter(cfg["model"])  # checks the model section (crop size included)
    train_set = CropDataset(
        train_records,
        cfg.get("crops"),
        size=model.crop_size,
        sampling_ratio=model.sampling_ratio,
        train=True,
        image_cache=bool(tcfg["image_cache"]),
    )
    train_loader = build_train_loader(train_set, cfg, collate, info)

    val_fn = None
    if val_records:
        from cellmask.engine.amp import amp_dtype

        amp_on, dtype_name = bool(tcfg["amp"]), tcfg["amp_dtype"]
        max_images = get(cfg, "val.max_images")
        records = list(val_records)[: int(max_images) if max_images else None]

        def val_fn(m, epoch, info):
            amp = amp_dtype(dtype_name, info.device) if amp_on else False  # training's own dtype
            mine = evaluate_segmenter(m, shard(records, info), info.device, amp=amp)
            return merge_means(gather_objects(mine, info), SEGMENTER_VAL_WEIGHTS)

    return model, train_loader, val_fn


IMAGE_TYPE_VAL_WEIGHTS = {"accuracy": "images"}
"""How the ranks' image-type accuracies combine: weighted by their image counts."""


def image_type_parts(
    cfg: dict[str, Any], train_records: list, val_records: list, num_classes: int, info: Any
) -> tuple[Any, Any, Any]:
    """``(model, train loader, val_fn)`` of the image-type classifier
    (:mod:`cellmask.models.image_type`): the detectors' training images and windows
    (``augment``), validated by the fraction of whole validation images given their type
    (``val_accuracy``; each rank classifies its shard)."""

    from cellmask.data.datasets import DetectionDataset, collate
    from cellmask.data.transforms import build_transforms
    from cellmask.engine import (
        build_train_loader,
        gather_objects,
        merge_means,
        seed_everything,
        shard,
        train_config,
    )
    from cellmask.models.image_type import _type_label, build_image_classifier, image_types

    tcfg = train_config(cfg)
    augment = cfg.get("augment") or {}
    train_set = DetectionDataset(
        train_records, build_transforms(augment, train=True), image_cache=bool(tcfg["image_cache"])
    )
    train_loader = build_train_loader(train_set, cfg, collate, info)
    seed_everything(int(tcfg["seed"]))
    model = build_image_classifier(cfg["model"], num_classes)

    val_fn = None
    if val_records:
        val_set = DetectionDataset(val_records, build_transforms(augment, train=False))

        def val_fn(m, epoch, info):
            right = total = 0
            for i in shard(range(len(val_set)), info):
                image, target = val_set[i]
                truth = _type_label(target)
                if truth:
                    right += int(image_types(m, [image.to(info.device)])[0] == truth)
                    total += 1
            mine = {"accuracy": right / total if total else float("nan"), "images": float(total)}
            return merge_means(gather_objects(mine, info), IMAGE_TYPE_VAL_WEIGHTS)

    return model, train_loader, val_fn
