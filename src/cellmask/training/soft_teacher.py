"""Training parts of Soft Teacher (branch 4), picked by ``cellmask train`` for ``model.type: soft_teacher``.

:func:`soft_teacher_parts` follows the parts-builder contract of ``cellmask.training.command``
(``(cfg, train_records, val_records, num_classes, info) -> (model, train_loader, val_fn)``):

- the model: :class:`~cellmask.models.soft_teacher.SoftTeacher` built by ``build_detector``
  with the run's ``semi:`` section;
- the loader: groups of labeled images and unlabeled weak/strong views (``semi:``) from
  ``<data root>/train_semi_supervised/`` (:mod:`cellmask.data.semi`), sharded and re-seeded per
  epoch by ``cellmask.engine.build_train_loader``. Labeled images take ``semi.labeled`` ([22]'s
  labeled pipeline: resize on the canvas, flip, colour; the paper profile) or, where it is
  null, the supervised detectors' ``augment:`` pipeline (the cpu/demo/smoke profiles);
- ``val_fn(model, epoch, info)``: COCO box AP of the **teacher** on this rank's share of the
  validation images, gathered over the ranks (every rank returns the same ``AP``, ``AP50``,
  ``AP75``; ``best.pt`` follows ``val_AP``). Rank 0 also writes
  ``pseudo_boxes_epoch_XXX.png`` (:mod:`cellmask.models.soft_teacher.figure`) into the run
  directory ``cfg["run"]["out_dir"]`` (skipped, with a warning, where the config has none).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cellmask.config import get

__all__ = ["SEMI_KEYS", "soft_teacher_parts"]

log = logging.getLogger("cellmask.training.soft_teacher")

SEMI_KEYS = (
    "unlabeled_dir",
    "ratio",
    "epoch_length",
    "crop",
    "labeled",
    "weak",
    "strong",
    "ema",
    "pseudo",
    "jitter",
    "unsup_weight",
    "figure",
)
"""The keys of the ``semi:`` section (data: ``cellmask.data.semi``; model:
``cellmask.models.soft_teacher.settings``; ``figure: {images: N}`` here)."""


def _check_semi(semi: Mapping[str, Any]) -> None:
    unknown = sorted(set(semi) - set(SEMI_KEYS))
    if unknown:
        raise ValueError(f"semi: unknown key(s) {unknown}; expected {sorted(SEMI_KEYS)}")


def _warn_multiscale(cfg: Mapping[str, Any]) -> None:
    """[22]'s ``rand_resize`` scales content relative to one test scale: a ``model.transform``
    that draws its own training size (a list of ``min_size``) adds a second scale on top."""
    if isinstance(get(cfg, "model.transform.min_size"), list | tuple):
        log.warning(
            "semi.labeled/weak/strong rand_resize assumes one model.transform size; "
            "model.transform.min_size %s also draws a training scale per image",
            get(cfg, "model.transform.min_size"),
        )


def soft_teacher_parts(
    cfg: dict[str, Any], train_records: list, val_records: list, num_classes: int, info: Any
) -> tuple[Any, Any, Any]:
    """``(SoftTeacher, train loader, val_fn)`` (contract 4; module doc).

    Raises:
        DataError: the unlabeled folder is missing or empty (the message names it).
        ValueError: an unknown ``semi:`` key.
    """
    import numpy as np
    from torch.utils.data import Subset

    from cellmask.data.datasets import DetectionDataset, ImageSource, collate
    from cellmask.data.semi import (
        SemiDataset,
        TwoViewDataset,
        build_labeled_transforms,
        collate_semi,
        load_unlabeled,
        semi_data_config,
    )
    from cellmask.data.transforms import build_transforms
    from cellmask.engine import build_eval_loader, build_train_loader, seed_everything, shard
    from cellmask.models import build_detector
    from cellmask.models.soft_teacher.figure import pseudo_boxes, save_pseudo_box_figure
    from cellmask.training.validation import evaluate_detector

    semi = dict(cfg.get("semi") or {})
    _check_semi(semi)
    data = semi_data_config(semi)
    unlabeled = load_unlabeled(cfg["data"]["root"], data["unlabeled_dir"])
    augment = cfg.get("augment") or {}
    cache = bool(get(cfg, "train.image_cache", False))
    if data["labeled"] is None:
        labeled_transforms = build_transforms(augment, train=True)
    else:
        labeled_transforms = build_labeled_transforms(data["labeled"])
    if any((data[v] or {}).get("rand_resize") is not None for v in ("labeled", "weak", "strong")):
        _warn_multiscale(cfg)
    labeled_set = DetectionDataset(train_records, labeled_transforms, image_cache=cache)
    views = TwoViewDataset(unlabeled, data["weak"], data["strong"], image_cache=cache, crop=data["crop"])
    train_set = SemiDataset(labeled_set, views, data["ratio"], data["epoch_length"])
    train_loader = build_train_loader(train_set, cfg, collate_semi, info)
    log.info(
        "Soft Teacher: %d labeled and %d unlabeled images, %d groups of %d:%d per epoch",
        len(labeled_set), len(views), len(train_set), *data["ratio"],
    )  # fmt: skip

    seed_everything(int(get(cfg, "train.seed", 0)))  # the model's initialisation is reproducible
    model = build_detector({**cfg["model"], "semi": semi}, num_classes=num_classes)

    amp, amp_dtype = bool(get(cfg, "train.amp", False)), str(get(cfg, "train.amp_dtype", "auto"))
    out_dir = get(cfg, "run.out_dir")
    n_figure = int((semi.get("figure") or {}).get("images", 4))
    figure_source = ImageSource(unlabeled[:n_figure], image_cache=True)
    val_set = DetectionDataset(val_records, build_transforms(augment, train=False))
    val_loader = build_eval_loader(Subset(val_set, shard(range(len(val_set)), info)), cfg, collate)
    if out_dir is None:
        log.warning("config has no run.out_dir: the pseudo-box figure will not be written")

    def val_fn(m, epoch: int, dist_info: Any = None) -> dict[str, float]:
        dist_info = dist_info or info
        bare = getattr(m, "module", m)
        device = dist_info.device
        metrics = evaluate_detector(
            bare.inference_model(), val_loader, device, num_classes=num_classes,
            amp=amp, amp_dtype=amp_dtype, info=dist_info,
        )  # fmt: skip
        if dist_info.is_main and out_dir is not None and len(figure_source):
            images = [figure_source.read(i) for i in range(len(figure_source))]
            boxes = pseudo_boxes(bare, images, device)
            path = Path(out_dir) / f"pseudo_boxes_epoch_{epoch + 1:03d}.png"
            mean_kept = float(np.mean([b["kept"].sum() for b in boxes]))
            save_pseudo_box_figure(
                path,
                images,
                boxes,
                names=[r.image_id for r in figure_source.records],
                title=f"epoch {epoch + 1}: {mean_kept:.1f} pseudo-boxes per image, val AP {metrics['AP']:.3f}",
            )
        return metrics

    return model, train_loader, val_fn
