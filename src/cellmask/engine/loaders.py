"""Data loaders whose batches depend only on ``(train.seed, epoch)``, however many workers load them.

The training loader's sampler (:class:`EpochSampler` over a
:class:`~torch.utils.data.DistributedSampler`) yields ``(epoch, index)`` pairs, and the dataset
is wrapped in a :class:`SeededDataset`, which seeds torch's CPU generator, numpy's global RNG
and python ``random`` from ``(seed, epoch, index)`` before it reads item ``index``. So an item's
augmentation is a function of those three numbers only: not of the number of workers, of
which worker reads it, or of what that worker read before. The epoch reaches the workers inside
the sampler's output (not through shared state), which is what lets the workers persist across
epochs (``persistent_workers``), and with them each worker's image cache.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from cellmask.data.datasets import collate
from cellmask.engine.defaults import train_config
from cellmask.engine.dist import DistInfo, init_distributed
from cellmask.engine.rng import item_seed, kept_cpu_rngs, seed_cpu_rngs

log = logging.getLogger("cellmask.engine")

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]
"""``(images, targets)`` as :func:`cellmask.data.datasets.collate` makes it."""


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for each index of ``sampler``; :meth:`set_epoch` sets the epoch
    (and the wrapped sampler's, when it has ``set_epoch``)."""

    def __init__(self, sampler: Sampler[int] | Iterable[int]) -> None:
        self.sampler = sampler
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Set the epoch; ``skip``: leave out this epoch's first ``skip`` indices (a run resumed
        inside the epoch: the indices after them are the ones an uninterrupted pass yields)."""
        self.epoch = int(epoch)
        self.skip = max(int(skip), 0)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(index)) for index in itertools.islice(self.sampler, self.skip, None))

    def __len__(self) -> int:
        # the whole epoch's, skip or not: what a run counts its iterations per epoch by
        return len(self.sampler)  # type: ignore[arg-type]


class BalancedSampler(Sampler[int]):
    """Each epoch, ``len(groups)`` indices drawn so that each group gets a share of the draws
    proportional to ``n_group ** (1 - power)``: ``power`` 0 is the uniform order over items (each
    group its natural share), 1 gives every group the same share (a cell type with 6% of the
    images gets a third of the steps). Within a group, items come in a shuffled cycle (every item
    once before any twice). Deterministic in ``(seed, epoch)``; ``rank::num_replicas`` of the
    draws for one replica (as :class:`~torch.utils.data.DistributedSampler`, padded to a
    multiple of the replicas).
    """

    def __init__(
        self, groups: list[str], power: float, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if not 0.0 <= float(power) <= 1.0:
            raise ValueError(f"train.type_balance must be in [0, 1], got {power}")
        self.groups, self.power, self.seed = list(groups), float(power), int(seed)
        self.num_replicas, self.rank, self.epoch = int(num_replicas), int(rank), 0
        self.num_samples = -(-len(self.groups) // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shares(self) -> dict[str, float]:
        """Each group's expected share of the draws."""
        sizes = {g: self.groups.count(g) for g in dict.fromkeys(self.groups)}
        weights = {g: n ** (1.0 - self.power) for g, n in sizes.items()}
        total = sum(weights.values())
        return {g: w / total for g, w in weights.items()}

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        names = list(self.shares())
        members = {g: [i for i, x in enumerate(self.groups) if x == g] for g in names}
        weights = torch.tensor([self.shares()[g] for g in names], dtype=torch.float64)
        total = self.num_samples * self.num_replicas
        picks = torch.multinomial(weights, total, replacement=True, generator=generator).tolist()
        cycles: dict[str, list[int]] = {g: [] for g in names}
        drawn = []
        for k in picks:
            g = names[k]
            if not cycles[g]:
                cycles[g] = [
                    members[g][i] for i in torch.randperm(len(members[g]), generator=generator).tolist()
                ]
            drawn.append(cycles[g].pop())
        return iter(drawn[self.rank : total : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class SeededDataset(Dataset):
    """``dataset`` read by ``(epoch, index)`` keys, with the global RNGs seeded per item.

    ``self[(epoch, index)]`` seeds torch's CPU generator, numpy's global RNG and python ``random``
    from :func:`~cellmask.engine.rng.item_seed` ``(seed, epoch, index)``, then returns
    ``dataset[index]``. In the main process (``num_workers=0``) the three RNG states are restored
    afterwards, so loading draws nothing from the training's own random streams.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        if not isinstance(key, tuple) or len(key) != 2:
            raise TypeError(f"SeededDataset is read by (epoch, index) keys (EpochSampler's), got {key!r}")
        epoch, index = key
        if get_worker_info() is not None:  # a loader worker: its RNG streams serve loading only
            seed_cpu_rngs(item_seed(self.seed, epoch, index))
            return self.dataset[index]
        with kept_cpu_rngs():
            seed_cpu_rngs(item_seed(self.seed, epoch, index))
            return self.dataset[index]


def build_train_loader(
    dataset: Dataset,
    cfg: Mapping[str, Any],
    collate_fn: Callable | None = None,
    info: DistInfo | None = None,
    *,
    persistent_workers: bool | None = None,
) -> DataLoader:
    """A shuffling loader whose batches depend only on ``(train.seed, epoch)`` (module docstring).

    The order comes from a :class:`~torch.utils.data.DistributedSampler` (one replica unless
    distributed; :func:`set_loader_epoch` sets its epoch), or with ``train.type_balance`` > 0 and a
    dataset whose items have groups (``item_groups()``: cell types) a :class:`BalancedSampler`; items are read through a
    :class:`SeededDataset` (``loader.dataset.dataset`` is ``dataset``). Batch size
    ``train.batch_size`` per process, ``train.num_workers`` workers, persistent unless
    ``persistent_workers=False``, each preparing ``train.prefetch_factor`` batches ahead; memory
    pinned on CUDA.
    """
    tcfg = train_config(cfg)
    info = info or init_distributed()
    seed = int(tcfg["seed"])
    workers = int(tcfg["num_workers"])
    balance = float(tcfg.get("type_balance") or 0.0)
    groups = dataset.item_groups() if balance and hasattr(dataset, "item_groups") else None
    if balance and groups is None:
        log.warning("train.type_balance %g ignored: %s has no item groups", balance, type(dataset).__name__)
    if groups and len(set(groups)) > 1:
        sampler: Sampler[int] = BalancedSampler(groups, balance, seed, info.world_size, info.rank)
    else:
        sampler = DistributedSampler(
            dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed
        )
    options: dict[str, Any] = {}
    if workers > 0:
        options["persistent_workers"] = True if persistent_workers is None else bool(persistent_workers)
        options["prefetch_factor"] = int(tcfg["prefetch_factor"])
    generator = torch.Generator()  # the loader's own draws (worker base seeds) leave the global RNG alone
    generator.manual_seed(seed)
    return DataLoader(
        SeededDataset(dataset, seed),
        batch_size=int(tcfg["batch_size"]),
        sampler=EpochSampler(sampler),
        num_workers=workers,
        collate_fn=collate_fn or collate,
        pin_memory=info.device.type == "cuda",
        generator=generator,
        **options,
    )


def build_eval_loader(
    dataset: Dataset, cfg: Mapping[str, Any], collate_fn: Callable | None = None
) -> DataLoader:
    """A loader in dataset order (batch ``train.batch_size``, ``train.num_workers`` workers)."""
    tcfg = train_config(cfg)
    return DataLoader(
        dataset,
        batch_size=int(tcfg["batch_size"]),
        shuffle=False,
        num_workers=int(tcfg["num_workers"]),
        collate_fn=collate_fn or collate,
    )


def set_loader_epoch(loader: Iterable, epoch: int, seed: int, rank: int = 0, skip_batches: int = 0) -> bool:
    """Set the epoch of ``loader``'s sampler(s) (order and, for :func:`build_train_loader`'s
    loaders, every item's augmentation); a loader built with a ``generator`` (worker seeds of a
    plain DataLoader) has it re-seeded from ``(seed, epoch, rank)``.

    ``skip_batches``: the epoch starts after its first ``skip_batches`` batches (a run resumed
    inside an epoch). Returns whether the loader's :class:`EpochSampler` leaves them out (nothing
    is read); ``False``: the caller must skip them itself (an :class:`EpochSampler`-less loader).
    """
    skipped = skip_batches == 0
    for obj in (
        getattr(loader, "sampler", None),
        getattr(loader, "batch_sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        if isinstance(obj, EpochSampler) and getattr(loader, "batch_size", None):
            obj.set_epoch(epoch, skip_batches * int(loader.batch_size))  # type: ignore[attr-defined]
            skipped = True
        elif hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
    return skipped


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor inside nested lists/tuples/dicts moved to ``device`` (others kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj
