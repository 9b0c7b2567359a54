"""Chunked segmenter training data (cellmask.data.crops, ``crops.chunk_size``): in the paper profile
one epoch of the engine's loader visits every instance of every image exactly once, in items of
at most ``chunk_size`` crops, on crowded synthetic images (~2000 cells) and on the real fixture
images; the demo, cpu and smoke profiles keep one item per image and their numbers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cellmask.config import deep_merge, load_config
from cellmask.data.crops import CropDataset, chunk_bounds, crop_config, instance_pixels, step_subset
from cellmask.data.datasets import collate
from cellmask.data.records import ImageRecord
from cellmask.engine import build_train_loader, set_loader_epoch

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "segmenter_upernet_swin_t.yaml"
SIZE = 16  # crop side: coverage and bounds do not depend on it, and small crops keep the test fast
SEED = 7


def paper_cfg(**train) -> dict:
    """The paper profile's config, loading in the main process (no workers) unless overridden."""
    return deep_merge(load_config(CONFIG, "paper"), {"train": {"num_workers": 0, "seed": SEED, **train}})


def grid_record(tmp_path: Path, n: int, name: str, height: int = 520, width: int = 704) -> ImageRecord:
    """A ``height x width`` image of ``n`` square cells on a 13-pixel grid (8x8 pixels; every 97th
    one a single pixel, under ``min_area``), its RLE built run by run (no ``[n, H, W]`` stack)."""
    pitch = 13
    cols = (width - 2) // pitch
    if -(-n // cols) * pitch > height:
        raise ValueError(f"{n} cells do not fit a {height}x{width} grid of pitch {pitch}")
    image = np.zeros((height, width), dtype=np.uint8)
    boxes, segmentations = [], []
    for i in range(n):
        y0, x0 = 1 + (i // cols) * pitch, 1 + (i % cols) * pitch
        side = 1 if i % 97 == 50 else 8
        image[y0 : y0 + side, x0 : x0 + side] = 200
        boxes.append([x0, y0, x0 + side, y0 + side])
        segmentations.append(" ".join(f"{(y0 + r) * width + x0 + 1} {side}" for r in range(side)))
    path = tmp_path / f"{name}.png"
    cv2.imwrite(str(path), image)
    return ImageRecord(
        image_id=name,
        path=path,
        height=height,
        width=width,
        cell_type="shsy5y",
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.ones(n, dtype=np.int64),
        segmentations=segmentations,
        seg_format="rle",
    )


def trainable(records: list[ImageRecord], min_area: int) -> Counter:
    """Every ``(image index, instance)`` pair of at least ``min_area`` pixels, once."""
    return Counter(
        (image, i)
        for image, record in enumerate(records)
        for i in range(len(record))
        if len(instance_pixels(record, i)[0]) >= min_area
    )


def one_epoch(loader, epoch: int, skip: int = 0) -> list[tuple[list[torch.Tensor], list[dict]]]:
    set_loader_epoch(loader, epoch, SEED, skip_batches=skip)
    return list(loader)


def check_epoch(batches, cfg: dict) -> Counter:
    """Assert the bounds of every item and step; return how often each pair was trained on."""
    crops_cfg = cfg["crops"]
    chunk, cap = crops_cfg["chunk_size"], crops_cfg["max_per_step"]
    seen: Counter = Counter()
    for crops, targets in batches:
        assert len(targets) <= cfg["train"]["batch_size"]
        for c, t in zip(crops, targets, strict=True):
            assert len(c) == len(t["instances"]) == len(t["masks"]) <= chunk  # an item: one chunk
            assert c.shape[1:] == (1, SIZE, SIZE) and t["max_per_step"] == cap
            seen.update((t["image_id"], i) for i in t["instances"].tolist())
        assert sum(len(c) for c in crops) <= cap  # a step: at most batch_size chunks
        assert step_subset(targets) is None  # ... so the step cap drops no crop
    return seen


# ---------------------------------------------------------------------------------- chunk bounds


@pytest.mark.parametrize(
    "n, k", [(0, 64), (1, 64), (63, 64), (64, 64), (65, 64), (313, 64), (2000, 64), (7, 1)]
)
def test_chunk_bounds_cover_every_instance_in_near_equal_chunks_of_at_most_k(n, k):
    bounds = chunk_bounds(n, k)
    sizes = np.diff(bounds)
    assert bounds[0] == 0 and bounds[-1] == n and len(sizes) == -(-n // k)
    if n:
        assert sizes.max() <= k and sizes.max() - sizes.min() <= 1 and sizes.min() >= 1
    assert chunk_bounds(313, 64)[1:] == [62, 125, 187, 250, 313]  # 62-63 each, no leftover chunk
    with pytest.raises(ValueError, match="at least 1"):
        chunk_bounds(5, 0)


def test_crop_config_chunk_size_and_max_instances_exclude_each_other():
    full = paper_cfg()["crops"]
    assert crop_config(full)["chunk_size"] == 64
    with pytest.raises(ValueError, match="exclude each other"):
        crop_config({**full, "max_instances": 64})
    with pytest.raises(ValueError, match="chunk_size"):
        crop_config({**full, "chunk_size": 0})
    without = {k: v for k, v in full.items() if k != "chunk_size"}
    with pytest.raises(ValueError, match="crops.chunk_size: missing"):
        crop_config(without)


# ---------------------------------------------------------------------------------- paper epochs


def test_paper_epoch_visits_every_instance_of_crowded_images_exactly_once(tmp_path: Path):
    """Two 520x704 images of 2000 and 313 cells (21 and 3 of them under min_area), one without
    cells: the paper profile's loader makes 32 + 5 items (none for the empty image), one epoch
    trains on every instance of at least min_area pixels exactly once, no item holds more than
    chunk_size crops and no step more than max_per_step (the cap never drops a crop). The next
    epoch visits them all again in another order; a run resumed inside an epoch reads the same
    batches, bit for bit, as the uninterrupted one."""
    records = [
        grid_record(tmp_path, 2000, "crowded"),
        grid_record(tmp_path, 0, "empty"),
        grid_record(tmp_path, 313, "livecell_like"),
    ]
    cfg = paper_cfg()
    ds = CropDataset(records, cfg["crops"], size=SIZE, sampling_ratio=2)
    assert len(ds) == 32 + 5 == len(ds.items)
    loader = build_train_loader(ds, cfg, collate)
    expected = trainable(records, cfg["crops"]["min_area"])
    assert len(expected) == 2000 - 21 + 313 - 3  # 21 and 3 one-pixel cells (i % 97 == 50)

    first = one_epoch(loader, 0)
    seen = check_epoch(first, cfg)
    assert seen == expected  # every trainable instance, exactly once
    assert len(first) == 19  # ceil(37 items / 2)

    second = one_epoch(loader, 1)
    assert check_epoch(second, cfg) == expected
    order = [[(t["image_id"], t["instances"][0].item()) for t in b[1]] for b in first]
    assert order != [[(t["image_id"], t["instances"][0].item()) for t in b[1]] for b in second]

    # chunks are fixed sets, their crops' augmentation is redrawn each epoch
    def by_chunk(batches) -> dict:
        return {
            (t["image_id"], *t["instances"].tolist()): c for b in batches for c, t in zip(*b, strict=True)
        }

    chunks, again = by_chunk(first), by_chunk(second)
    assert chunks.keys() == again.keys()
    assert sum(not torch.equal(chunks[k], again[k]) for k in chunks) >= len(chunks) - 1

    resumed = one_epoch(loader, 0, skip=7)
    assert len(resumed) == len(first) - 7
    for (c0, t0), (c1, t1) in zip(first[7:], resumed, strict=True):
        for a, b, ta, tb in zip(c0, c1, t0, t1, strict=True):
            assert torch.equal(a, b) and torch.equal(ta["masks"], tb["masks"])
            assert torch.equal(ta["instances"], tb["instances"]) and torch.equal(ta["keys"], tb["keys"])


def test_paper_epoch_visits_every_real_instance_exactly_once(real_records):
    """The 6 real fixture images (36 to 496 cells): one epoch of the paper profile's loader trains
    on every instance of at least min_area pixels once, in items of at most 64 crops."""
    records = list(real_records)
    cfg = paper_cfg()
    ds = CropDataset(records, cfg["crops"], size=SIZE, sampling_ratio=2, image_cache=True)
    assert len(ds) == sum(-(-len(r) // 64) for r in records) > len(records)
    seen = check_epoch(one_epoch(build_train_loader(ds, cfg, collate), 0), cfg)
    assert seen == trainable(records, cfg["crops"]["min_area"])
    assert max(len(r) for r in records) > 64  # a real image really is split


def test_paper_chunks_are_the_same_in_any_process_and_order(tmp_path: Path):
    """An image's chunks depend on its image_id only: not on torch's global RNG, nor on where
    the record sits in the list."""
    a, b = grid_record(tmp_path, 300, "a"), grid_record(tmp_path, 150, "b")
    crops_cfg = paper_cfg()["crops"]
    one = CropDataset([a, b], crops_cfg, size=SIZE, sampling_ratio=2)
    two = CropDataset([b, a], crops_cfg, size=SIZE, sampling_ratio=2)
    torch.manual_seed(0)
    chunks_one = [one.chunk(i)[1] for i in range(len(one)) if one.chunk(i)[0] == 0]
    torch.manual_seed(1)
    chunks_two = [two.chunk(i)[1] for i in range(len(two)) if two.chunk(i)[0] == 1]
    assert chunks_one == chunks_two and len(chunks_one) == 5
    assert sorted(i for c in chunks_one for i in c) == list(range(300))
    assert chunks_one[0] != list(range(60))  # a permutation, not the record's order
    evaluation = CropDataset([a, b], crops_cfg, size=SIZE, sampling_ratio=2, train=False)
    assert len(evaluation) == 2 and evaluation.items is None
    assert len(evaluation[0][1]["instances"]) == 300 - 3  # every instance of min_area, one item
    with pytest.raises(ValueError, match="chunked training dataset"):
        evaluation.chunk(0)


# ---------------------------------------------------------------------------------- other profiles


@pytest.mark.parametrize(
    "profile, per_image, per_step", [("demo", 32, 64), ("cpu", 24, 48), ("smoke", 16, 24)]
)
def test_other_profiles_keep_one_random_subset_per_image(tmp_path: Path, profile, per_image, per_step):
    """demo, cpu and smoke: no chunks, their caps unchanged, one item per image whose instances
    are the first ``max_instances`` of ``torch.randperm`` drawn from the loader's RNG (the draws
    of the per-image layout, so their runs and figures stay as they were)."""
    crops_cfg = load_config(CONFIG, profile)["crops"]
    assert crops_cfg["chunk_size"] is None
    assert (crops_cfg["max_instances"], crops_cfg["max_per_step"]) == (per_image, per_step)
    record = grid_record(tmp_path, 200, "img")
    ds = CropDataset([record, record], crops_cfg, size=SIZE, sampling_ratio=2)
    assert len(ds) == 2 and ds.items is None
    torch.manual_seed(3)
    _, target = ds[0]
    torch.manual_seed(3)
    order = [i for i in torch.randperm(200).tolist() if i % 97 != 50][:per_image]
    assert target["instances"].tolist() == order and target["image_id"] == 0
