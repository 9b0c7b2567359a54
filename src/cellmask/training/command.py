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

Which parts a config trains is decided by ``model.type``
(:func:`cellmask.training.parts.parts_builder`); the data split by
:func:`cellmask.training.split.load_split`.

Training datasets keep their decoded images in memory (``train.image_cache``, default true):
the loader's workers persist across epochs, so each worker reads an image from disk once per
run. Memory: 0.37 MB per 520x704 image per worker (606 competition images: ~222 MB per worker).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from cellmask.config import PROFILES, add_override_argument, load_config
from cellmask.training.parts import parts_builder
from cellmask.training.split import DATASETS, load_split

log = logging.getLogger("cellmask.training.command")


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
    p.add_argument(
        "--extend",
        action="store_true",
        help="with --resume and --epochs above the run's: a longer schedule (the lr schedule is recomputed)",
    )
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
        extend=args.extend,
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
    extend: bool = False,
) -> dict[str, Any]:
    """Read the data, build datasets, loaders and the model from ``cfg``, and :func:`~cellmask.engine.fit`.

    The parts come from :func:`parts_builder` (by ``model.type``).

    Returns :func:`~cellmask.engine.fit`'s result plus ``is_main`` (rank 0) and ``classes``.
    """
    from cellmask.data.inputs import default_data_root
    from cellmask.engine import check_continuation, cleanup_distributed, fit, init_distributed
    from cellmask.engine.status import saved_epochs

    data_root = Path(data_root) if data_root is not None else default_data_root()
    if resume and not (Path(out_dir) / "last.pt").is_file():  # fail before reading any data
        raise FileNotFoundError(f"{Path(out_dir) / 'last.pt'}: no such checkpoint to resume from")
    if resume:  # the run's own epochs unless given; a continuation that changes the run fails here
        epochs = epochs if epochs is not None else saved_epochs(out_dir)
        check_continuation(out_dir, cfg, epochs, extend)
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
            extend=extend,
        )
        result.update(is_main=info.is_main, classes=classes)
        return result
    finally:
        if info.distributed:
            cleanup_distributed()
