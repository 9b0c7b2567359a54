"""The engine's data side: loaders whose batches depend only on (seed, epoch, index) whatever the
workers, their options (persistent workers, prefetch, pinned memory), and the shard / gather
helpers of distributed validation."""

from __future__ import annotations

import math
import random

import pytest
import torch
from engine_toys import ToyDataset, tiny_cfg

from cellmask.engine import (
    DistInfo,
    SeededDataset,
    build_train_loader,
    gather_objects,
    merge_means,
    set_loader_epoch,
    shard,
    unshard,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _epochs(loader, epochs: int = 2) -> list[list[torch.Tensor]]:
    out = []
    for epoch in range(epochs):
        set_loader_epoch(loader, epoch, seed=0)
        out.append([torch.stack(images) for images, _ in loader])
    return out


def test_batches_are_the_same_with_0_2_and_2_persistent_workers():
    data = ToyDataset(n=6)  # every item draws from torch, numpy and python random
    cfg = tiny_cfg(num_workers=0)
    torch.manual_seed(5)
    main_process = _epochs(build_train_loader(data, cfg))
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # loading drew nothing from the training's RNG
    workers = _epochs(build_train_loader(data, tiny_cfg(num_workers=2), persistent_workers=False))
    persistent = build_train_loader(data, tiny_cfg(num_workers=2, prefetch_factor=1))
    assert persistent.persistent_workers and persistent.prefetch_factor == 1
    kept = _epochs(persistent)
    for other in (workers, kept):
        for a, b in zip(main_process, other, strict=True):
            assert len(a) == len(b) == 3 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # the epoch reaches the items: the same image is augmented differently in the next epoch
    seeded = SeededDataset(data, seed=0)
    first, second = seeded[(0, 4)][0], seeded[(1, 4)][0]
    assert torch.equal(first, seeded[(0, 4)][0]) and not torch.equal(first, second)


def test_train_loader_options():
    data = ToyDataset(n=4)
    cpu = build_train_loader(data, tiny_cfg(num_workers=0), info=DistInfo())
    assert not cpu.pin_memory and cpu.dataset.dataset is data and len(cpu) == 2
    cuda = build_train_loader(data, tiny_cfg(num_workers=2), info=DistInfo(device=torch.device("cuda", 0)))
    assert cuda.pin_memory and cuda.persistent_workers and cuda.prefetch_factor == 2  # the default
    ranks = [build_train_loader(data, tiny_cfg(), info=DistInfo(rank=r, world_size=2)) for r in (0, 1)]
    seen = [index for loader in ranks for _, index in loader.sampler]
    assert sorted(seen) == [0, 1, 2, 3]  # two ranks, disjoint shards of the dataset


def test_shard_unshard_and_gather_in_one_process():
    items = list(range(7))
    parts = [shard(items, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert unshard(parts) == items and unshard([items]) == items
    with pytest.raises(ValueError, match=r"sizes \[3, 1, 2\]"):
        unshard([[0, 3, 6], [1], [2, 5]])
    assert gather_objects({"a": 1}, DistInfo()) == [{"a": 1}]
    assert shard(items, DistInfo()) == items


def test_merge_means_weights_each_mean_by_its_count():
    weights = {"mIoU": "instances", "mIoU_image": "images"}
    parts = [
        {"mIoU": 0.5, "mIoU_image": 0.4, "instances": 30, "images": 1},
        {"mIoU": 0.8, "mIoU_image": 0.7, "instances": 10, "images": 3},
        {"mIoU": math.nan, "mIoU_image": math.nan, "instances": 0, "images": 0},  # an empty shard
    ]
    merged = merge_means(parts, weights)
    # by hand: (0.5 * 30 + 0.8 * 10) / 40 and (0.4 * 1 + 0.7 * 3) / 4
    assert merged == {
        "mIoU": pytest.approx(0.575),
        "mIoU_image": pytest.approx(0.625),
        "instances": 40.0,
        "images": 4.0,
    }
    # the merge of shards equals the means over the pooled values
    rng = random.Random(0)
    values = [[rng.random() for _ in range(rng.randint(1, 6))] for _ in range(5)]
    pooled = sum(map(sum, values)) / sum(map(len, values))
    parts = [{"mIoU": sum(v) / len(v), "mIoU_image": 0.0, "instances": len(v), "images": 1} for v in values]
    assert merge_means(parts, weights)["mIoU"] == pytest.approx(pooled)
    assert math.isnan(merge_means(parts[:0] + [parts[2] | {"instances": 0}] * 2, weights)["mIoU"])
    assert merge_means(parts[:1], weights) == parts[0]  # one process: unchanged
    with pytest.raises(ValueError, match="lacks instances"):
        merge_means([{"mIoU": 0.5, "mIoU_image": 0.5, "images": 1}] * 2, weights)
    with pytest.raises(ValueError, match="AP"):
        merge_means([parts[0] | {"AP": 1.0}] * 2, weights)
