"""Instance crops (cellmask.data.crops): RoIAlign geometry, mask targets, jitter, flips/rot90, dataset."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cellmask.config import deep_merge, load_config
from cellmask.data.crops import (
    CROP_KEYS,
    CropDataset,
    crop_config,
    crop_masks,
    crop_rois,
    dihedral,
    instance_pixels,
    jitter_boxes,
    random_dihedral,
    step_subset,
    tight_boxes,
)
from cellmask.data.datasets import collate
from cellmask.data.records import ImageRecord
from cellmask.data.rle import rle_encode

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "segmenter_upernet_swin_t.yaml"


def crops_cfg(**overrides) -> dict:
    """The smoke profile's ``crops`` section with ``overrides`` merged in."""
    return deep_merge(load_config(CONFIG, "smoke")["crops"], overrides)


def _asymmetric_mask(h: int = 40, w: int = 50, top: int = 7, left: int = 9) -> torch.Tensor:
    """An L with a notch: no flip or rotation maps it onto itself."""
    m = torch.zeros((h, w), dtype=torch.bool)
    m[top : top + 20, left : left + 5] = True  # vertical bar
    m[top + 15 : top + 20, left : left + 14] = True  # foot to the right
    m[top + 2 : top + 4, left + 5 : left + 8] = True  # notch near the top
    return m


def _box_after(box: torch.Tensor, size: tuple[int, int], k: int, hflip: bool, vflip: bool) -> torch.Tensor:
    """The box of an image of ``size = (H, W)`` after :func:`dihedral` (flips, then k x rot90)."""
    x0, y0, x1, y1 = box.tolist()
    h, w = size
    if hflip:
        x0, x1 = w - x1, w - x0
    if vflip:
        y0, y1 = h - y1, h - y0
    for _ in range(k % 4):  # counter-clockwise: new (x, y) = (y, W - x); size becomes (W, H)
        x0, y0, x1, y1 = y0, w - x1, y1, w - x0
        h, w = w, h
    return torch.tensor([x0, y0, x1, y1], dtype=torch.float32)


# ------------------------------------------------------------------------------ crop geometry


def test_crop_rois_samples_cell_centres_of_the_continuous_box():
    """On a linear ramp the crop equals the ramp at the cell centres: cell q of box [x0, x1] is
    centred at x0 + (q + 0.5)(x1 - x0)/S, and continuous coordinate c reads pixel index c - 0.5."""
    h, w, s = 60, 80, 16
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    image = torch.stack([xs, ys])[None]  # channel 0: column index, channel 1: row index
    boxes = torch.tensor([[10.0, 5.0, 42.0, 21.0], [3.3, 7.9, 20.2, 40.6], [50.0, 30.0, 51.0, 31.0]])
    crops = crop_rois(image, boxes, size=s)
    assert crops.shape == (3, 2, s, s)
    q = torch.arange(s, dtype=torch.float32)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        cx = x0 + (q + 0.5) * (x1 - x0) / s - 0.5
        cy = y0 + (q + 0.5) * (y1 - y0) / s - 0.5
        torch.testing.assert_close(crops[i, 0], cx[None, :].expand(s, s), atol=1e-4, rtol=0)
        torch.testing.assert_close(crops[i, 1], cy[:, None].expand(s, s), atol=1e-4, rtol=0)


def test_crop_rois_batches_images_and_accepts_rois():
    images = torch.rand(2, 3, 30, 40)
    b0, b1 = (
        torch.tensor([[1.0, 2.0, 20.0, 25.0]]),
        torch.tensor([[5.0, 5.0, 15.0, 12.0], [0.0, 0.0, 40.0, 30.0]]),
    )
    out = crop_rois(images, [b0, b1], size=32)
    assert out.shape == (3, 3, 32, 32)
    torch.testing.assert_close(out[0], crop_rois(images[0], b0, size=32)[0])
    rois = torch.cat([torch.tensor([[1.0], [1.0]]), b1], 1)
    torch.testing.assert_close(out[1:], crop_rois(images, rois, size=32))
    assert crop_rois(images, [torch.zeros(0, 4), torch.zeros(0, 4)], size=32).shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="list of box tensors"):
        crop_rois(images, b0)


def test_crop_masks_equals_crop_rois_of_the_mask_and_accepts_pixels_or_dense():
    mask = _asymmetric_mask()
    rng = torch.Generator().manual_seed(0)
    tight = tight_boxes([tuple(np.nonzero(mask.numpy()))])
    boxes = torch.cat([tight, jitter_boxes(tight.repeat(20, 1), (0.7, 1.3), 0.15, generator=rng)])
    ref = crop_rois(mask.float()[None, None], boxes, size=32)
    pixels = [tuple(np.nonzero(mask.numpy()))] * len(boxes)
    from_pixels = crop_masks(pixels, boxes, size=32)
    from_dense = crop_masks(mask[None].expand(len(boxes), -1, -1), boxes, size=32)
    torch.testing.assert_close(from_pixels, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_dense, ref, atol=1e-5, rtol=0)
    assert crop_masks([], torch.zeros(0, 4), size=32).shape == (0, 1, 32, 32)


def test_crop_masks_treats_outside_the_image_as_background():
    """A mask touching the right border ends exactly at the border (not half a pixel beyond)."""
    h, w = 20, 30
    mask = torch.ones((1, h, w), dtype=torch.bool)
    box = torch.tensor([[w - 10.0, 0.0, w + 10.0, 20.0]])  # 20 px wide, 1 px per cell
    target = crop_masks(mask, box, size=20)[0, 0] >= 0.5
    assert target[:, :10].all() and not target[:, 10:].any()


def test_crop_masks_of_many_instances_in_one_image_are_independent():
    rng = np.random.default_rng(0)
    h, w = 70, 90
    masks = np.zeros((12, h, w), dtype=bool)
    for i in range(12):
        y, x = rng.integers(2, h - 12), rng.integers(2, w - 14)  # off the border (see above)
        masks[i, y : y + rng.integers(2, 10), x : x + rng.integers(2, 12)] = True
    boxes = tight_boxes([tuple(np.nonzero(m)) for m in masks])
    got = crop_masks(torch.from_numpy(masks), boxes, size=32)
    for i in range(12):
        ref = crop_rois(torch.from_numpy(masks[i]).float()[None, None], boxes[i : i + 1], size=32)
        torch.testing.assert_close(got[i : i + 1], ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ augmentation


def test_jitter_boxes_ranges_clipping_and_reproducibility():
    boxes = torch.tensor([[100.0, 50.0, 140.0, 70.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(1)
    out = jitter_boxes(boxes, scale=(0.8, 1.2), shift=0.1, generator=g)
    w, h = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    assert w.min() >= 0.8 * 40 - 1e-4 and w.max() <= 1.2 * 40 + 1e-4
    assert h.min() >= 0.8 * 20 - 1e-4 and h.max() <= 1.2 * 20 + 1e-4
    cx, cy = (out[:, 0] + out[:, 2]) / 2, (out[:, 1] + out[:, 3]) / 2
    assert (cx - 120).abs().max() <= 4 + 1e-4 and (cy - 60).abs().max() <= 2 + 1e-4
    assert w.std() > 3 and (cx - 120).std() > 1  # it does move
    again = jitter_boxes(boxes, scale=(0.8, 1.2), shift=0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert torch.equal(jitter_boxes(boxes, p=0.0), boxes)

    edge = torch.tensor([[0.0, 0.0, 10.0, 10.0], [95.0, 45.0, 100.0, 50.0], [99.8, 10.0, 100.0, 10.3]])
    clipped = jitter_boxes(edge.repeat(200, 1), (0.5, 1.5), 0.3, image_size=(50, 100))
    assert clipped[:, 0::2].min() >= 0 and clipped[:, 0::2].max() <= 100
    assert clipped[:, 1::2].min() >= 0 and clipped[:, 1::2].max() <= 50
    assert ((clipped[:, 2:] - clipped[:, :2]) >= 1 - 1e-5).all()


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize(("hflip", "vflip"), [(False, False), (True, False), (False, True), (True, True)])
def test_flipped_rotated_crop_equals_the_crop_of_the_flipped_rotated_image(k, hflip, vflip):
    """crop(T(image), T(box)) == T(crop(image, box)) for every flip/rotation T, image and target."""
    h, w = 48, 64
    rng = np.random.default_rng(k + 4 * hflip + 8 * vflip)
    mask = _asymmetric_mask(h, w)
    image = torch.from_numpy(rng.random((h, w), dtype=np.float32)) + 2.0 * mask  # texture + cell
    boxes = torch.tensor([[8.0, 6.0, 24.5, 28.0], [0.0, 3.3, 17.0, 48.0], [40.2, 20.0, 64.0, 33.7]])
    crops = crop_rois(image[None, None], boxes, size=32)
    targets = crop_masks(mask[None].expand(len(boxes), -1, -1), boxes, size=32)
    t_image = dihedral(image, k, hflip, vflip)
    t_mask = dihedral(mask, k, hflip, vflip)
    t_boxes = torch.stack([_box_after(b, (h, w), k, hflip, vflip) for b in boxes])
    aug_crops, aug_targets = (dihedral(x, k, hflip, vflip) for x in (crops, targets))
    torch.testing.assert_close(crop_rois(t_image[None, None], t_boxes, size=32), aug_crops, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        crop_masks(t_mask[None].expand(len(boxes), -1, -1), t_boxes, size=32), aug_targets, atol=1e-5, rtol=0
    )


def test_random_dihedral_applies_one_draw_to_all_tensors_and_covers_the_group():
    torch.manual_seed(0)
    base = torch.rand(1, 1, 8, 8)
    crops = base.repeat(400, 2, 1, 1)
    targets = (base >= 0.5).repeat(400, 1, 1, 1)
    a, b = random_dihedral(crops, targets)
    assert torch.equal(a[:, :1] >= 0.5, b) and torch.equal(a[:, 0], a[:, 1])
    variants = {tuple(x.flatten().tolist()) for x in a[:, 0]}
    assert len(variants) == 8  # the 8 flips/rotations of a generic square
    same, _ = random_dihedral(crops, targets, hflip=0.0, vflip=0.0, rot90=False)
    assert torch.equal(same, crops)


def test_crop_config_needs_every_key_and_validates():
    full = crops_cfg()
    assert crop_config(full) == full and set(full) == set(CROP_KEYS)
    assert crop_config({**full, "jitter": None})["jitter"] is None
    for key in CROP_KEYS:
        with pytest.raises(ValueError, match=rf"crops\.{key}: missing"):
            crop_config({k: v for k, v in full.items() if k != key})
    with pytest.raises(ValueError, match=r"crops\.jitter\.shift: missing"):
        crop_config({**full, "jitter": {"p": 1.0, "scale": [0.8, 1.2]}})
    with pytest.raises(ValueError, match="crops: missing section"):
        crop_config(None)
    with pytest.raises(ValueError, match="unknown key"):
        crop_config({**full, "rotate": 15})
    with pytest.raises(ValueError, match="hflip"):
        crop_config({**full, "hflip": 2})
    with pytest.raises(ValueError, match="scale"):
        crop_config(crops_cfg(jitter={"scale": [1.2, 0.8]}))
    with pytest.raises(ValueError, match="max_per_step"):
        crop_config({**full, "max_per_step": 0})
    with pytest.raises(ValueError, match="crops: missing section"):
        CropDataset([], None, size=32, sampling_ratio=2)


def test_step_subset_keeps_a_uniform_random_subset_across_images():
    """Over the cap, a step keeps the cap's count of crops, those with the smallest keys, in batch
    order; with uniform keys each image keeps a share proportional to its crops on average (not
    an even split nor first-come-first-served). Within the cap, or without one: everything."""
    gen = torch.Generator().manual_seed(0)

    def targets(counts, cap):
        return [{"keys": torch.rand(n, generator=gen), "max_per_step": cap} for n in counts]

    assert step_subset(targets([3, 5], 8)) is None and step_subset(targets([3, 5], None)) is None
    batch = targets([4, 6], 5)
    keep = step_subset(batch)
    keys = torch.cat([t["keys"] for t in batch])
    assert keep.dtype == torch.long and keep.tolist() == sorted(torch.argsort(keys)[:5].tolist())
    assert step_subset([*batch, {"keys": torch.rand(1), "max_per_step": 2}]).numel() == 2  # the smallest cap
    counts = [10, 30, 60, 0]
    bounds = np.cumsum([0, *counts])
    kept = np.array(
        [np.histogram(step_subset(targets(counts, 20)).numpy(), bins=bounds)[0] for _ in range(3000)]
    )
    assert (kept.sum(1) == 20).all()
    np.testing.assert_allclose(kept.mean(0), [2, 6, 12, 0], atol=0.15)
    assert kept[:, 0].max() > 2 and kept[:, 2].min() < 12  # it is random


# ------------------------------------------------------------------------------ dataset


def _record(tmp_path: Path, masks: np.ndarray, image: np.ndarray, name: str = "img") -> ImageRecord:
    path = tmp_path / f"{name}.png"
    cv2.imwrite(str(path), image)
    pixels = [tuple(np.nonzero(m)) for m in masks]
    return ImageRecord(
        image_id=name,
        path=path,
        height=image.shape[0],
        width=image.shape[1],
        cell_type="shsy5y",
        boxes=tight_boxes(pixels).numpy(),
        labels=np.ones(len(masks), dtype=np.int64),
        segmentations=[rle_encode(m) for m in masks],
        seg_format="rle",
    )


def test_dataset_crop_and_target_stay_aligned_under_jitter_flips_and_rotations(tmp_path: Path):
    """The image is the union of two asymmetric cells (white on black) far apart: whatever the
    jitter, flip and rotation, the image crop thresholded at 0.5 must be the target."""
    h, w = 80, 120
    masks = np.zeros((2, h, w), dtype=bool)
    masks[0, 10:50, 10:60] = _asymmetric_mask(40, 50, 7, 9).numpy()
    masks[1, 30:70, 65:115] = _asymmetric_mask(40, 50, 10, 25).numpy()[::-1]  # a flipped L
    image = (masks.any(0) * 255).astype(np.uint8)
    record = _record(tmp_path, masks, image)
    cfg = crops_cfg(max_instances=None, max_per_step=None, jitter={"scale": [0.8, 1.2], "shift": 0.1})
    ds = CropDataset([record], cfg, size=32, sampling_ratio=2)
    torch.manual_seed(0)
    seen = set()
    for _ in range(25):
        crops, target = ds[0]
        assert crops.shape == (2, 1, 32, 32) and crops.dtype == torch.float32
        assert target["masks"].shape == (2, 1, 32, 32) and target["masks"].dtype == torch.uint8
        assert target["image_id"] == 0 and sorted(target["instances"].tolist()) == [0, 1]
        sure = (crops - 0.5).abs() > 0.02
        assert torch.equal((crops >= 0.5)[sure], target["masks"].bool()[sure])
        assert target["masks"].flatten(1).sum(1).min() > 50
        seen.add(tuple(target["boxes"][0].round(decimals=2).tolist()))
    assert len(seen) > 20  # boxes really are jittered


def test_dataset_eval_mode_uses_tight_boxes_and_no_augmentation(tmp_path: Path):
    h, w = 60, 70
    masks = np.zeros((3, h, w), dtype=bool)
    masks[0, 5:25, 5:30] = _asymmetric_mask(20, 25, 0, 0).numpy()[:20, :25]
    masks[1, 30:50, 40:60] = True
    masks[2, 55, 3] = True  # one pixel: below min_area
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (h, w), dtype=np.uint8)
    record = _record(tmp_path, masks, image)
    ds = CropDataset(
        [record],
        crops_cfg(min_area=4, max_instances=1, max_per_step=1),
        size=32,
        sampling_ratio=2,
        train=False,
    )
    crops, target = ds[0]
    assert target["instances"].tolist() == [0, 1]
    torch.testing.assert_close(target["boxes"], torch.as_tensor(record.boxes[:2]))
    ref = crop_rois(
        torch.from_numpy(image).float()[None, None] / 255, torch.as_tensor(record.boxes[:2]), size=32
    )
    torch.testing.assert_close(crops, ref)
    ref_t = crop_masks(torch.from_numpy(masks[:2]), torch.as_tensor(record.boxes[:2]), size=32) >= 0.5
    assert torch.equal(target["masks"].bool(), ref_t)

    capped = CropDataset([record], crops_cfg(max_instances=1), size=32, sampling_ratio=2, train=True)
    assert len(capped[0][1]["instances"]) == 1
    empty = _record(tmp_path, np.zeros((0, h, w), dtype=bool), image, "empty")
    crops, target = CropDataset([empty], crops_cfg(), size=32, sampling_ratio=2)[0]
    assert crops.shape == (0, 1, 32, 32) and target["masks"].shape == (0, 1, 32, 32)


def test_instance_pixels_match_the_record_masks(real_records):
    record = real_records[0]
    for i in (0, 5, len(record) - 1):
        ys, xs = instance_pixels(record, i)
        m = np.zeros((record.height, record.width), dtype=bool)
        m[ys, xs] = True
        assert np.array_equal(m, record.mask(i))
    assert np.allclose(
        tight_boxes([instance_pixels(record, i) for i in range(len(record))]).numpy(), record.boxes
    )


def _many_cells(tmp_path: Path, n_images: int = 4) -> list[ImageRecord]:
    """Images of 4 x 4 pixel cells on a grid, 6 to 6 + 4 x (n_images - 1) cells each."""
    records = []
    for j in range(n_images):
        k = 6 + 4 * j
        masks = np.zeros((k, 40, 60), dtype=bool)
        for i in range(k):
            y, x = 2 + 8 * (i // 6), 2 + 10 * (i % 6)
            masks[i, y : y + 4, x : x + 4] = True
        records.append(_record(tmp_path, masks, (masks.any(0) * 200).astype(np.uint8), f"img{j}"))
    return records


def test_items_carry_the_step_cap_and_keys_drawn_by_the_loader(tmp_path: Path):
    """Training items carry crops.max_per_step and one uniform key per crop, drawn with the
    item's augmentation from the loader's RNG: a loader with the same seed (worker process
    included) gives the same keys and so the same step subsets, another seed others.
    Evaluation items set no cap."""
    records = _many_cells(tmp_path)  # 6, 10, 14, 18 cells
    ds = CropDataset(records, crops_cfg(max_instances=12, max_per_step=14), size=16, sampling_ratio=2)

    def run(seed: int) -> list[list[tuple[int, int]]]:
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=2,
            shuffle=True,
            collate_fn=collate,
            num_workers=1,
            generator=torch.Generator().manual_seed(seed),
        )
        steps = []
        for crops, targets in loader:
            for c, t in zip(crops, targets, strict=True):
                assert len(c) == len(t["keys"]) == len(t["instances"]) <= 12 and t["max_per_step"] == 14
                assert t["keys"].dtype == torch.float32 and ((t["keys"] >= 0) & (t["keys"] < 1)).all()
            pairs = [(t["image_id"], i) for t in targets for i in t["instances"].tolist()]
            keep = step_subset(targets)
            assert keep is not None and len(keep) == 14 < len(pairs)  # every pair of images offers > 14
            steps.append([pairs[k] for k in keep.tolist()])
        return steps

    first = run(1)
    assert len(first) == 2 and first == run(1) and first != run(2)
    assert all(len({image for image, _ in step}) == 2 for step in first)  # both images keep crops
    evaluation = CropDataset(records, crops_cfg(), size=16, sampling_ratio=2, train=False)
    assert evaluation[3][1]["max_per_step"] is None and len(evaluation[3][0]) == 18
