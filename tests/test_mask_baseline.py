"""The Cascade Mask R-CNN baseline's masks: targets from windows of the truth in the pixel-edge
convention, pasted back with ``paste_masks`` as ``PastedMasks`` in original-image pixels.

(Its learning is checked in tests/test_detector_overfit.py: mean mask IoU after overfitting.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _host_syncs import HostSyncs
from torchvision.models.detection.transform import resize_boxes

import cellmask.data.datasets as datasets_module
from cellmask.config import load_config
from cellmask.data.crops import crop_masks, crop_rois, instance_pixels, tight_boxes, window_groups
from cellmask.data.datasets import DetectionDataset
from cellmask.data.layers import MaskWindows, layers_to_masks
from cellmask.data.transforms import build_transforms
from cellmask.models import build_detector
from cellmask.models.mask_head import roi_mask_targets
from cellmask.models.segmenter import PastedMasks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


@pytest.fixture(scope="module")
def baseline():
    """The smoke baseline at the paper's input size (520x704 -> 531x720), eval mode."""
    cfg = load_config(
        CONFIGS / "cascade_mask_rcnn_resnext101.yaml",
        profile="smoke",
        overrides={"model": {"transform": {"min_size": 540, "max_size": 720}}},
    )
    torch.manual_seed(0)
    return build_detector(cfg["model"], num_classes=4).eval()


def dense_masks(pixels, height: int, width: int) -> torch.Tensor:
    """uint8 ``[N, H, W]`` masks of instances given as ``(rows, cols)`` pixel arrays."""
    masks = torch.zeros((len(pixels), height, width), dtype=torch.uint8)
    for j, (ys, xs) in enumerate(pixels):
        masks[j, ys, xs] = 1
    return masks


def round_trip_ious(model, record, batch: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Encode every truth mask of ``record`` at its own box through the baseline's target path
    and paste it back through its transform: ``(IoU with the truth [N], box sizes [N, 2])``."""
    h, w = record.height, record.width
    pixels = [instance_pixels(record, i) for i in range(len(record))]
    boxes = tight_boxes(pixels)
    resized = (531, 720)  # what the transform makes of 520x704 at min 540 / max 720
    rois = resize_boxes(boxes, [h, w], list(resized))
    heads, transform = model.roi_heads, model.transform
    ious = []
    for s in range(0, len(pixels), batch):
        part = pixels[s : s + batch]
        masks = dense_masks(part, h, w)
        targets = heads.mask_targets(
            [rois[s : s + batch]], [torch.arange(len(part))], [resized], [{"masks": masks}], 28
        )
        pred = {"boxes": rois[s : s + batch].clone(), "masks": targets[:, None]}
        pasted = transform.postprocess([pred], [resized], [(h, w)])[0]["masks"]
        assert isinstance(pasted, PastedMasks) and pasted.image_size == (h, w)
        assert torch.allclose(pred["boxes"], boxes[s : s + batch], atol=1e-3)  # back in original pixels
        for j in range(len(part)):
            got, truth = pasted.mask(j), masks[j].bool()
            ious.append(float((got & truth).sum() / (got | truth).sum()))
    return np.array(ious), (boxes[:, 2:] - boxes[:, :2]).numpy()


def test_truth_masks_encoded_and_pasted_back_match_the_truth(baseline, real_records):
    per_class: dict[str, list[np.ndarray]] = {}
    for record in real_records:
        ious, _ = round_trip_ious(baseline, record)
        per_class.setdefault(record.cell_type, []).append(ious)
    every = np.concatenate([np.concatenate(v) for v in per_class.values()])
    assert len(every) == sum(len(r) for r in real_records) > 1000
    # measured: min 0.815, mean 0.9963; shsy5y/cort min 0.971; 22 of 1167 under 0.95, all
    # astrocytes whose processes are thinner than a 28th of their box (the 28x28 mask's limit)
    assert every.mean() >= 0.99, every.mean()
    assert (every >= 0.95).mean() >= 0.97
    for cell_type in ("shsy5y", "cort"):
        compact = np.concatenate(per_class[cell_type])
        assert compact.min() >= 0.95, (cell_type, compact.min())
    assert np.concatenate(per_class["astro"]).mean() >= 0.97


def test_targets_are_the_aligned_crop_of_the_truth_window(real_records):
    # the same geometry as the segmenter's crops (cellmask.data.crops), from windows of a dense
    # stack, for boxes that are jittered and leave the image
    record = real_records[0]
    pixels = [instance_pixels(record, i) for i in range(12)]
    masks = dense_masks(pixels, record.height, record.width)
    g = torch.Generator().manual_seed(0)
    boxes = tight_boxes(pixels) + torch.randn(12, 4, generator=g) * 3
    boxes[0] = torch.tensor([-5.0, -3.0, 20.0, 15.0])  # over the top-left corner
    order = torch.randperm(12, generator=g)  # RoIs matched to truths in any order
    got = roi_mask_targets(masks, boxes[order], order, 28, 2)
    expected = crop_masks(masks[order], boxes[order], size=28, sampling_ratio=2)[:, 0]
    assert got.shape == (12, 28, 28) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-6)
    assert (got > 0.5).sum() > 12 * 50  # real content, not zeros


def test_targets_follow_the_resize_between_rois_and_masks(baseline, real_records):
    # masks stay at the original size; RoIs of a 2x resized image give the same targets
    record = real_records[2]
    pixels = [instance_pixels(record, i) for i in range(10)]
    masks = dense_masks(pixels, record.height, record.width)
    boxes = tight_boxes(pixels)
    heads, idx = baseline.roi_heads, [torch.arange(10)]
    size = (record.height, record.width)
    at_1x = heads.mask_targets([boxes], idx, [size], [{"masks": masks}], 28)
    at_2x = heads.mask_targets([boxes * 2], idx, [(2 * size[0], 2 * size[1])], [{"masks": masks}], 28)
    assert torch.equal(at_1x, at_2x)
    shifted = heads.mask_targets([boxes + 2], idx, [size], [{"masks": masks}], 28)
    assert (shifted - at_1x).abs().max() > 0.5  # a 2 px shift is visible


def predict_at(model, image: torch.Tensor, score_thresh: float) -> dict:
    """``model([image])[0]`` with the RoI heads' score threshold set to ``score_thresh``."""
    before = model.roi_heads.score_thresh
    model.roi_heads.score_thresh = score_thresh
    try:
        with torch.no_grad():
            return model([image])[0]
    finally:
        model.roi_heads.score_thresh = before


def test_eval_output_is_pasted_masks_in_original_pixels(baseline):
    # 200x300 in, resized by the transform; every detection's mask lies within its own box
    out = predict_at(baseline, torch.rand(3, 200, 300), score_thresh=0.0)
    masks = out["masks"]
    assert isinstance(masks, PastedMasks) and masks.image_size == (200, 300)
    assert len(masks) == len(out["boxes"]) > 0
    for i in range(min(len(masks), 20)):
        y0, x0 = masks.offsets[i].tolist()
        h, w = masks.windows[i].shape
        bx0, by0, bx1, by1 = out["boxes"][i].tolist()
        assert bx0 - 1 <= x0 and x0 + w <= bx1 + 1 and by0 - 1 <= y0 and y0 + h <= by1 + 1
    # nothing survives a score threshold above 1: an empty PastedMasks of the image's size
    out = predict_at(baseline, torch.rand(3, 96, 120), score_thresh=1.1)
    assert out["boxes"].shape == (0, 4) and len(out["masks"]) == 0 and out["masks"].image_size == (96, 120)


# ----------------------------------------------------------------- windowed truth (issue 22)


def reference_roi_mask_targets(masks, rois, matched_idxs, size, sampling_ratio):
    """``roi_mask_targets`` as it was before the truth came in windows: full-image ``[G, H, W]``
    masks, one canvas slice copied per RoI (the reference the windowed path must equal)."""
    device = masks.device
    out = torch.zeros((rois.shape[0], size, size), dtype=torch.float32, device=device)
    if rois.shape[0] == 0:
        return out
    height, width = masks.shape[-2:]
    boxes = rois.detach().float().cpu()
    wx0 = torch.floor(boxes[:, 0] - 0.5).long() - 1
    wy0 = torch.floor(boxes[:, 1] - 0.5).long() - 1
    ww = (torch.floor(boxes[:, 2] - 0.5).long() + 3 - wx0).clamp(min=1)
    wh = (torch.floor(boxes[:, 3] - 0.5).long() + 3 - wy0).clamp(min=1)
    idx = matched_idxs.tolist()
    x0s, y0s, ws, hs = wx0.tolist(), wy0.tolist(), ww.tolist(), wh.tolist()
    local = boxes - torch.stack([wx0, wy0, wx0, wy0], 1).float()
    for group in window_groups(torch.stack([wh, ww], 1), 1 << 22):
        members = group.tolist()
        canvas = torch.zeros(
            (len(members), 1, max(hs[i] for i in members), max(ws[i] for i in members)),
            dtype=torch.float32,
            device=device,
        )
        for j, i in enumerate(members):
            ys, ye = max(y0s[i], 0), min(y0s[i] + hs[i], height)
            xs, xe = max(x0s[i], 0), min(x0s[i] + ws[i], width)
            if ye > ys and xe > xs:
                canvas[j, 0, ys - y0s[i] : ye - y0s[i], xs - x0s[i] : xe - x0s[i]] = masks[
                    idx[i], ys:ye, xs:xe
                ]
        batch_idx = torch.arange(len(members), dtype=torch.float32)[:, None]
        window_rois = torch.cat([batch_idx, local[group]], 1).to(device)
        out[group.to(device)] = crop_rois(canvas, window_rois, size, sampling_ratio)[:, 0]
    return out


@pytest.fixture(scope="module")
def synthetic_records(tmp_path_factory):
    """Synthetic competition images (shsy5y 422 cells, cort, astro; RLE) and LIVECell images
    (polygons) at 520x704."""
    from cellmask.data.livecell import read_livecell_coco
    from cellmask.data.sartorius import read_train_csv
    from cellmask.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("windows")
    write_dataset(root, n_train=3, n_unlabeled=0, n_test=0, n_livecell=2, seed=3, size=(520, 704))
    livecell = root / "LIVECell_dataset_2021"
    polygons = read_livecell_coco(
        livecell / "annotations" / "LIVECell" / "livecell_coco_train.json", livecell / "images"
    )
    return read_train_csv(root / "train.csv", root / "train") + polygons


def full_image_item(monkeypatch, dataset: DetectionDataset, index: int) -> tuple[torch.Tensor, dict]:
    """``dataset[index]`` through the old path: the warped layers unpacked into a full-image
    uint8 ``[N, H, W]`` stack of the kept instances."""
    n = len(dataset.records[index])
    with monkeypatch.context() as m:
        m.setattr(datasets_module, "layers_to_windows", lambda layers, keep: layers_to_masks(layers, n)[keep])
        return dataset[index]


PIPELINES = {
    "none": None,
    "rotate_flip_scale": {
        "hflip": 0.5,
        "vflip": 0.5,
        "shift_scale_rotate": {"p": 1.0, "rotate": 40, "shift": 0.05, "scale": 0.2},
    },
    "crop": {"crop": [256, 320], "shift_scale_rotate": {"p": 1.0, "rotate": 20}},
    "resize": {"resize": [390, 528], "shift_scale_rotate": {"p": 0.5, "rotate": 15}},
}


def assert_same_masks(windows: MaskWindows, dense: torch.Tensor) -> None:
    """``windows`` holds exactly the masks of the uint8 ``[N, H, W]`` stack (no second stack)."""
    assert len(windows) == len(dense) and windows.data.dtype == dense.dtype
    assert int(windows.data.sum()) == int(dense.sum())  # nothing outside the windows
    for i, (x0, y0, x1, y1) in enumerate(windows.boxes.tolist()):
        assert torch.equal(windows.window(i), dense[i, y0:y1, x0:x1])


def jittered_rois(boxes: torch.Tensor, n: int, image_size: tuple[int, int], seed: int):
    """``(rois [n, 4], matched indices [n])``: truth boxes jittered by a few pixels (some far),
    a few leaving the image."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(boxes), (n,), generator=g)
    rois = boxes[idx] + torch.randn(n, 4, generator=g) * 3
    rois[: n // 10] += torch.randn(n // 10, 4, generator=g) * 25
    h, w = image_size
    rois[-3:] = torch.tensor(
        [[-9.0, -7.0, 30.0, 25.0], [w - 20.0, h - 15.0, w + 8.0, h + 12.0], [-4.0, 5, 3, 9]]
    )
    x0, x1 = torch.minimum(rois[:, 0], rois[:, 2]), torch.maximum(rois[:, 0], rois[:, 2]) + 0.5
    y0, y1 = torch.minimum(rois[:, 1], rois[:, 3]), torch.maximum(rois[:, 1], rois[:, 3]) + 0.5
    return torch.stack([x0, y0, x1, y1], 1), idx


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_window_targets_equal_the_full_image_path(
    monkeypatch, real_records, synthetic_records, augment_only, pipeline
):
    """DetectionDataset(with_masks=True) yields each kept truth cropped to its box after the warp:
    the same pixels as the old full-image stack, and mask-head targets bit for bit those the old
    code built from that stack, on the 6 real images and 4 synthetic ones (RLE and LIVECell polygons)."""
    cfg = PIPELINES[pipeline]
    transforms = None if cfg is None else build_transforms(augment_only(**cfg), train=True)
    records = list(real_records) + list(synthetic_records)
    dataset = DetectionDataset(records, transforms, with_masks=True)
    checked = 0
    for index, record in enumerate(records):
        torch.manual_seed(index)
        image, target = dataset[index]
        torch.manual_seed(index)
        old_image, old = full_image_item(monkeypatch, dataset, index)
        assert torch.equal(image, old_image) and torch.equal(target["boxes"], old["boxes"])
        windows, dense = target["masks"], old["masks"]
        assert isinstance(windows, MaskWindows) and windows.image_size == tuple(dense.shape[-2:])
        assert_same_masks(windows, dense)
        if len(dense) == 0:
            continue
        # each window is its warped mask's tight box: the target box (LIVECell keeps its COCO
        # boxes when nothing moves); all windows together hold less than two images' pixels
        if transforms is not None or record.seg_format == "rle":
            assert torch.equal(windows.boxes.float(), target["boxes"])
        height, width = windows.image_size
        assert windows.data.numel() <= 2 * height * width < dense.numel()
        rois, idx = jittered_rois(target["boxes"], 300, windows.image_size, seed=index)
        expected = reference_roi_mask_targets(dense, rois, idx, 28, 2)
        assert torch.equal(roi_mask_targets(windows, rois, idx, 28, 2), expected)
        assert torch.equal(roi_mask_targets(dense, rois, idx, 28, 2), expected)  # a stack still works
        assert (expected > 0.5).sum() > 300 * 20  # real content, not zeros
        checked += 1
    assert len(records) == 10 and checked >= 9  # (a crop may hold no cell)


def test_heads_read_windows_through_the_resize(baseline, real_records):
    """``CascadeRoIHeads.mask_targets`` maps RoIs of the resized image onto the windows' image
    size as it did onto the stack's, and its only host copy per image is the RoIs' boxes."""
    record = real_records[0]
    _, target = DetectionDataset([record], with_masks=True)[0]
    windows, boxes = target["masks"], target["boxes"]
    dense = windows.dense()
    idx = [torch.arange(len(boxes))]
    shape = [(2 * record.height, 2 * record.width)]
    got = baseline.roi_heads.mask_targets([boxes * 2], idx, shape, [{"masks": windows}], 28)
    assert torch.equal(got, baseline.roi_heads.mask_targets([boxes * 2], idx, shape, [{"masks": dense}], 28))
    counts = []
    for n in (20, len(boxes)):
        with HostSyncs() as syncs:
            roi_mask_targets(windows, boxes[:n], torch.arange(n), 28, 2)
        counts.append(syncs.calls)
    assert counts[0] == counts[1] and counts[0]["cpu"] == 1, counts  # none per RoI
