"""The training engine every model shares: optimiser, schedule, epochs, checkpoints, AMP, DDP.

One loop for the detectors, the segmenter and Soft Teacher. A model plugs in by its calling
convention only:

* if it defines ``training_step(batch) -> dict`` that is called (Soft Teacher);
* else ``model(images, targets)`` must return the dict (torchvision detectors);
* if it defines ``on_optimizer_step(iteration)``, that is called after every optimizer step
  taken (Soft Teacher's EMA teacher); ``iteration`` is the run's 0-based iteration index;
* if it defines ``map_init_state_dict(state) -> state``, ``--init`` checkpoints go through it.

In the dict, keys starting with ``loss`` are summed into the total loss; any other key is a
statistic (float or 0-d tensor), logged but not added. A batch is ``(images, targets)`` as
:func:`cellmask.data.datasets.collate` makes it; :func:`move_to_device` moves every tensor in it.

Modules: :mod:`~cellmask.engine.defaults` (the ``train`` section), :mod:`~cellmask.engine.rng`,
:mod:`~cellmask.engine.dist` (process group, shard / gather), :mod:`~cellmask.engine.optim`,
:mod:`~cellmask.engine.loaders`, :mod:`~cellmask.engine.checkpoints`,
:mod:`~cellmask.engine.loop` (one epoch), :mod:`~cellmask.engine.history` (CSV, plot) and
:mod:`~cellmask.engine.runner` (the run, :func:`fit`). Everything public is importable from here.

Run directory written by :func:`fit` (rank 0 only)::

    out_dir/config.yaml     the resolved config
    out_dir/last.pt         everything needed to resume (weights, optimiser, scheduler, scaler,
                            epoch, config, history, best, RNG states of every rank)
    out_dir/epoch_XXX.pt    weights + epoch + config + that epoch's metrics, every
                            ``train.checkpoint_every`` epochs and the last; only the newest
                            ``train.keep_epoch_checkpoints`` are kept (null: all). No optimiser
                            state (as the authors' ``save_optimizer=False``): a full ResNeXt-101
                            checkpoint is ~1 GB, x36 epochs would not fit Kaggle's disk.
    out_dir/best.pt         the same for the best epoch by ``train.monitor``
    out_dir/metrics.csv     one row per epoch (means over every rank's steps, validation); an
                            epoch cut by ``train.max_hours`` has ``stopped=max_hours`` and
                            ``iters`` (its iterations done), a resumed one ``resumed_at``, empty on other rows;
                            out_dir/metrics.png plots it (losses, statistics, validation, lr)
    out_dir/steps.csv       one row per iteration and rank: every value the step returned
    out_dir/status.json     finished or not, epochs done / planned, best epoch
                            (:mod:`~cellmask.engine.status`: only finished runs ship)

Checkpoints hold only tensors and plain containers, and every load uses
``torch.load(..., weights_only=True)``.

Wall-clock budget: ``train.max_hours`` (from the start of each :func:`fit` call; null or 0: none)
ends training after the iteration that passes it: the cut epoch is validated and saved, ``fit``
returns ``stopped="max_hours"``, and ``resume=True`` continues with the next batch, ending
bit-exactly as an uninterrupted run (:mod:`~cellmask.engine.runner`).

Determinism: :func:`fit` seeds every RNG at the start of a fresh run; the train loader's order
depends on ``(seed, epoch)`` and each item's augmentation on ``(seed, epoch, index)`` only (not
on the number of workers, which persist across epochs: :mod:`~cellmask.engine.loaders`); and
``last.pt`` carries the torch/CUDA/numpy/python RNG states, so ``resume=True`` continues a run
bit for bit (on the same device and software).

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) :func:`init_distributed` joins the process
group from the environment (NCCL on CUDA, Gloo on CPU), :func:`build_train_loader` shards with a
:class:`~torch.utils.data.DistributedSampler`, :func:`fit` wraps the step in
:class:`~torch.nn.parallel.DistributedDataParallel` (the model's ``training_step`` runs inside
DDP's forward, so gradients sync) and validates on every rank (each evaluates its
:func:`shard` and :func:`gather_objects` the rest); rank 0 writes the files.
``train.batch_size`` is per process.
"""

from cellmask.data.datasets import collate as collate_pairs  # the one collate; old name kept
from cellmask.engine.checkpoints import (
    CheckpointError,
    InitReport,
    checkpoint_state_dict,
    load_checkpoint,
    load_init_weights,
    prune_epoch_checkpoints,
    save_checkpoint,
)
from cellmask.engine.defaults import TRAIN_DEFAULTS, train_config
from cellmask.engine.dist import (
    DistInfo,
    barrier,
    cleanup_distributed,
    gather_objects,
    init_distributed,
    merge_means,
    resolve_device,
    shard,
    unshard,
)
from cellmask.engine.history import append_rows_csv, metric_panels, plot_metrics, write_metrics_csv
from cellmask.engine.loaders import (
    Batch,
    EpochSampler,
    SeededDataset,
    build_eval_loader,
    build_train_loader,
    move_to_device,
    set_loader_epoch,
)
from cellmask.engine.loop import (
    NonFiniteGuard,
    TrainStep,
    WallClockBudget,
    bare_model,
    epoch_means,
    train_one_epoch,
)
from cellmask.engine.optim import NO_DECAY_KEYS, build_optimizer, build_scheduler, lr_factor
from cellmask.engine.rng import item_seed, rng_state, seed_everything, set_rng_state
from cellmask.engine.run import Run, ValFn
from cellmask.engine.runner import fit
from cellmask.engine.status import ResumeError, RunStatus, check_continuation, read_status

__all__ = [
    "NO_DECAY_KEYS",
    "TRAIN_DEFAULTS",
    "Batch",
    "CheckpointError",
    "DistInfo",
    "EpochSampler",
    "InitReport",
    "NonFiniteGuard",
    "ResumeError",
    "Run",
    "RunStatus",
    "SeededDataset",
    "TrainStep",
    "ValFn",
    "WallClockBudget",
    "append_rows_csv",
    "bare_model",
    "barrier",
    "build_eval_loader",
    "build_optimizer",
    "build_scheduler",
    "build_train_loader",
    "check_continuation",
    "checkpoint_state_dict",
    "cleanup_distributed",
    "collate_pairs",
    "epoch_means",
    "fit",
    "gather_objects",
    "init_distributed",
    "item_seed",
    "load_checkpoint",
    "load_init_weights",
    "lr_factor",
    "merge_means",
    "metric_panels",
    "move_to_device",
    "plot_metrics",
    "prune_epoch_checkpoints",
    "read_status",
    "resolve_device",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_loader_epoch",
    "set_rng_state",
    "shard",
    "train_config",
    "train_one_epoch",
    "unshard",
    "write_metrics_csv",
]
