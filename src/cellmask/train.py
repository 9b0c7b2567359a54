"""``cellmask train``: train one detector, or the segmenter, on LIVECell or the competition data.

::

    cellmask train --config configs/cascade_rcnn_resnext101.yaml --data DATA_ROOT \\
        --dataset livecell --out runs/det2_livecell [--profile paper|demo|smoke]
    cellmask train --config configs/cascade_rcnn_resnext101.yaml --data DATA_ROOT \\
        --dataset sartorius --out runs/det2 --init runs/det2_livecell/best.pt

Data (paper, section 5.3): LIVECell's train + test splits train and its val split validates
(8 cell types, 9 classes with background); the competition's annotated images are split 95/5
(``train.val_fraction``) grouped by sample and stratified by cell type (3 types, 4 classes).
Validation is COCO box AP each epoch; ``best.pt`` keeps the best ``val_AP``.

The segmenter (``model.type: segmenter``, ``configs/segmenter_upernet_swin_t.yaml``) trains the
same way on the same splits, on crops of the truth instances; it validates by the mean mask IoU
of the validation instances segmented from their truth boxes (``val_mIoU``). It is
class-agnostic, so ``--init`` from a LIVECell segmenter carries every weight::

    cellmask train --config configs/segmenter_upernet_swin_t.yaml --data DATA_ROOT \\
        --dataset livecell --out runs/seg_livecell
    cellmask train --config configs/segmenter_upernet_swin_t_finetune.yaml --data DATA_ROOT \\
        --dataset sartorius --out runs/seg --init runs/seg_livecell/best.pt

Several GPUs: ``torchrun --nproc_per_node N -m cellmask.cli train ...`` (each process loads
``train.batch_size`` images per step, and validates its share of the validation images).

Which parts a config trains is decided by ``model.type`` (:func:`parts_builder`): ``segmenter``
-> :func:`segmenter_parts`, ``soft_teacher`` -> ``cellmask.train_soft_teacher.soft_teacher_parts``
(imported only then), anything else -> :func:`detector_parts`. A parts builder takes
``(cfg, train_records, val_records, num_classes, info)`` and returns
``(model, train_loader, val_fn)``; ``cfg["data"]["root"]`` holds the data root and ``cfg["run"]["out_dir"]`` the run directory.

Training datasets keep their decoded images in memory (``train.image_cache``, default true):
the loader's workers persist across epochs, so each worker reads an image from disk once per
run. Memory: 0.37 MB per 520x704 image per worker (606 competition images: ~222 MB per worker).
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellmask.config import PROFILES, add_override_argument, get, load_config

DATASETS = ("sartorius", "livecell")

log = logging.getLogger("cellmask.train")

SOFT_TEACHER_PARTS = "cellmask.train_soft_teacher:soft_teacher_parts"
"""The parts builder of ``model.type: soft_teacher`` (``module:function``, imported on use)."""

SEGMENTER_VAL_WEIGHTS = {"mIoU": "instances", "mIoU_image": "images"}
"""How the ranks' ``evaluate_segmenter`` results combine (:func:`cellmask.engine.merge_means`):
each mean weighted by the count it is a mean over."""

PartsBuilder = Callable[[dict[str, Any], list, list, int, Any], tuple[Any, Any, Any]]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The ``cellmask train`` arguments (the CLI registers them with :func:`cli_train`)."""
    p.add_argument("--config", required=True, help="model config YAML, e.g. configs/faster_rcnn_swin_t.yaml")
    p.add_argument(
        "--data",
        default=None,
        help="data root in the Kaggle layout (default: $CELLMASK_DATA, Kaggle's input folder, or data/synthetic)",
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="sartorius",
        help="sartorius: competition train.csv (95/5 split); livecell: LIVECell train+test / val (default sartorius)",
    )
    p.add_argument("--out", required=True, help="run directory (checkpoints, config.yaml, metrics.csv/png)")
    p.add_argument("--profile", choices=PROFILES, default="paper", help="config profile (default paper)")
    p.add_argument(
        "--init",
        default=None,
        metavar="CKPT",
        help="initialise weights from a checkpoint (class layers re-initialised if the class count differs)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--epochs", type=int, default=None, help="total epochs (overrides train.epochs)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    add_override_argument(
        p, "override a config value, e.g. --set train.lr=2e-4 (repeatable; value parsed as YAML)"
    )


def cli_train(args: argparse.Namespace) -> int:
    """Handler of ``cellmask train``; returns the exit status."""
    cfg = load_config(args.config, profile=args.profile, overrides=list(args.overrides) or None)
    result = run_training(
        cfg,
        data_root=args.data,
        dataset=args.dataset,
        out_dir=args.out,
        init=args.init,
        resume=args.resume,
        epochs=args.epochs,
        device=args.device,
    )
    if result.get("is_main", True):
        best = result.get("best")
        where = Path(result["out_dir"])
        if best:
            print(
                f"best {best['metric']} = {best['value']:.4f} at epoch {best['epoch']}: {where / 'best.pt'}"
            )
        print(f"run directory: {where}")
    return 0


def competition_split(cfg: dict[str, Any], data_root: str | Path):
    """The competition images under ``data_root`` as a :class:`~cellmask.data.folds.Split`:
    ``train.val_fraction`` for training's validation, ``train.holdout_fraction`` (default 0) held
    out for scoring only, grouped by sample and stratified by cell type, seeded by ``train.seed``.

    Raises:
        FileNotFoundError: a file of the layout is missing (the reader names it).
        DataError: fewer than 2 annotated images, or all in one sample group.
    """
    from cellmask.data.folds import split_records
    from cellmask.data.sartorius import read_train_csv
    from cellmask.errors import DataError
    from cellmask.paths import CompetitionLayout

    layout = CompetitionLayout(Path(data_root))
    records = read_train_csv(layout.train_csv, layout.train_dir)
    if len(records) < 2:
        raise DataError(
            f"{layout.train_csv}: {len(records)} annotated image(s); need at least 2 to train and validate"
        )
    fraction = float(get(cfg, "train.val_fraction", 0.05))
    holdout = float(get(cfg, "train.holdout_fraction", 0.0) or 0.0)
    groups = len({r.sample_id or r.image_id for r in records})
    if groups < 2:
        raise DataError(
            f"{layout.train_csv}: all images belong to one sample; cannot split off a validation set"
        )
    if round(1 / fraction) > groups:  # small (e.g. synthetic) data: fewer sample groups than folds
        fraction = 1.0 / groups
        log.warning("only %d sample groups: validation fraction raised to 1/%d", groups, groups)
        if holdout:
            holdout = fraction if groups >= 3 else 0.0
    return split_records(
        records, val_fraction=fraction, holdout_fraction=holdout, seed=int(get(cfg, "train.seed", 0))
    )


def load_split(
    cfg: dict[str, Any], data_root: str | Path, dataset: str
) -> tuple[list, list, tuple[str, ...]]:
    """``(train records, val records, class names)`` of ``dataset`` under ``data_root``; the
    competition's held-out images (``train.holdout_fraction``) are in neither.

    Raises:
        FileNotFoundError: a file of the layout is missing (the reader names it).
        DataError: no annotated image, or too few sample groups to split off a validation set.
    """
    from cellmask import CLASSES
    from cellmask.data.livecell import LIVECELL_CLASSES, read_livecell
    from cellmask.errors import DataError
    from cellmask.paths import CompetitionLayout

    if dataset == "livecell":
        layout = CompetitionLayout(Path(data_root))
        train = read_livecell(layout.livecell_root, ("train", "test"))
        val = read_livecell(layout.livecell_root, ("val",))
        classes: tuple[str, ...] = LIVECELL_CLASSES
    elif dataset == "sartorius":
        train, val, _ = competition_split(cfg, data_root)
        classes = CLASSES
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if not train:
        raise DataError(f"{data_root}: no training images for dataset {dataset}")
    return train, val, classes


def run_training(
    cfg: dict[str, Any],
    data_root: str | Path | None,
    dataset: str,
    out_dir: str | Path,
    *,
    init: str | Path | None = None,
    resume: bool = False,
    epochs: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Read the data, build datasets, loaders and the model from ``cfg``, and :func:`~cellmask.engine.fit`.

    The parts come from :func:`parts_builder` (by ``model.type``).

    Returns :func:`~cellmask.engine.fit`'s result plus ``is_main`` (rank 0) and ``classes``.
    """
    from cellmask.engine import cleanup_distributed, fit, init_distributed
    from cellmask.paths import default_data_root

    data_root = Path(data_root) if data_root is not None else default_data_root()
    if resume and not (Path(out_dir) / "last.pt").is_file():  # fail before reading any data
        raise FileNotFoundError(f"{Path(out_dir) / 'last.pt'}: no such checkpoint to resume from")
    if init is not None and not resume and not Path(init).is_file():
        raise FileNotFoundError(f"{init}: no such checkpoint (--init)")
    info = init_distributed(device)
    try:
        train_records, val_records, classes = load_split(cfg, data_root, dataset)
        num_classes = len(classes) + 1
        cfg = dict(cfg)
        cfg["data"] = {
            "dataset": dataset,
            "root": str(data_root),
            "classes": list(classes),
            "num_classes": num_classes,
            "num_train": len(train_records),
            "num_val": len(val_records),
        }
        # where parts may write figures (Soft Teacher's pseudo-boxes); the start, so that a saved
        # config tells a run from scratch from a fine-tuned one (cellmask demo --reuse)
        cfg["run"] = {"out_dir": str(out_dir), "init": str(init) if init is not None else None}
        log.info(
            "%s: %d training and %d validation images, %d classes",
            dataset,
            len(train_records),
            len(val_records),
            len(classes),
        )
        build_parts = parts_builder(cfg)
        model, train_loader, val_fn = build_parts(cfg, train_records, val_records, num_classes, info)
        result = fit(
            model,
            train_loader,
            val_fn,
            cfg,
            out_dir,
            resume=resume,
            init=init,
            epochs=epochs,
            device=info.device,
        )
        result.update(is_main=info.is_main, classes=classes)
        return result
    finally:
        if info.distributed:
            cleanup_distributed()


def parts_builder(cfg: dict[str, Any]) -> PartsBuilder:
    """The parts builder of ``cfg``'s ``model.type`` (see the module docstring).

    Raises:
        ImportError: ``soft_teacher`` when its builder cannot be imported (the message names it).
    """
    from cellmask.models.segmenter import is_segmenter_config

    if is_segmenter_config(cfg):
        return segmenter_parts
    kind = (cfg.get("model") or {}).get("type")
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

    from cellmask.coco_eval import evaluate_detector
    from cellmask.data.datasets import DetectionDataset, collate
    from cellmask.data.transforms import build_transforms
    from cellmask.engine import build_eval_loader, build_train_loader, seed_everything, shard, train_config
    from cellmask.models import build_detector

    tcfg = train_config(cfg)
    augment = cfg.get("augment") or {}
    with_masks = bool(get(cfg, "model.mask.enabled", False))
    train_set = DetectionDataset(
        train_records,
        build_transforms(augment, train=True),
        with_masks=with_masks,
        image_cache=bool(tcfg["image_cache"]),
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
        amp = bool(tcfg["amp"])
        max_images = get(cfg, "val.max_images")
        records = list(val_records)[: int(max_images) if max_images else None]

        def val_fn(m, epoch, info):
            mine = evaluate_segmenter(m, shard(records, info), info.device, amp=amp)
            return merge_means(gather_objects(mine, info), SEGMENTER_VAL_WEIGHTS)

    return model, train_loader, val_fn
