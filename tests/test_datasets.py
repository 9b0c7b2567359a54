"""DetectionDataset / UnlabeledDataset / collate on the real competition and LIVECell samples."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cellmask.data.datasets import DetectionDataset, UnlabeledDataset, collate
from cellmask.data.images import read_image
from cellmask.data.layers import MaskWindows
from cellmask.data.livecell import LIVECELL_CLASS_TO_LABEL, read_livecell_coco
from cellmask.data.records import ImageRecord, polygons_to_mask
from cellmask.data.rle import rle_encode
from cellmask.data.transforms import build_transforms
from cellmask.errors import DataError

torch.set_num_threads(1)

H, W = 520, 704


@pytest.fixture(scope="module")
def cort(real_records) -> ImageRecord:
    """The real cort image 01ae5a43a2ab (36 instances): small enough for full mask stacks."""
    (record,) = [r for r in real_records if r.image_id == "01ae5a43a2ab"]
    return record


@pytest.fixture(scope="module")
def cort_masks(cort) -> np.ndarray:
    return cort.masks()


def test_item_without_augmentation(real_records, cort, cort_masks):
    ds = DetectionDataset(real_records)
    assert len(ds) == 6 and ds.records[0] is real_records[0]
    for i, record in enumerate(real_records):
        image, target = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, H, W)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert set(target) == {"boxes", "labels", "image_id"} and target["image_id"] == i
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        np.testing.assert_array_equal(target["boxes"].numpy(), record.boxes)
        np.testing.assert_array_equal(target["labels"].numpy(), record.labels)
    gray = read_image(real_records[0].path)
    image, _ = ds[0]
    for c in range(3):
        np.testing.assert_allclose(image[c].numpy(), gray / 255.0, atol=1e-6)

    idx = real_records.index(cort)
    image, target = DetectionDataset(real_records, with_masks=True)[idx]
    masks = target["masks"]  # each instance's window, unpacked here into a full-image stack
    assert isinstance(masks, MaskWindows) and len(masks) == 36 and masks.image_size == (H, W)
    assert masks.data.dtype == torch.uint8 and masks.data.numel() < 0.01 * 36 * H * W
    np.testing.assert_array_equal(masks.dense().numpy(), cort_masks.astype(np.uint8))
    np.testing.assert_array_equal(masks.boxes.numpy(), cort.boxes)  # windows: the tight boxes
    np.testing.assert_array_equal(target["boxes"].numpy(), cort.boxes)


def test_duplicated_and_overlapping_masks_survive_the_geometric_path(real_records, augment_only):
    """de504eaa5349 (496 shsy5y cells) has overlaps and one duplicated mask."""
    (record,) = [r for r in real_records if r.image_id == "de504eaa5349"]
    ds = DetectionDataset([record], transforms=build_transforms(augment_only(resize=[H, W]), train=True))
    assert ds.transforms.geometric
    _, target = ds[0]  # resize to the same size: identity on pixels, boxes from the masks
    np.testing.assert_array_equal(target["boxes"].numpy(), record.boxes)
    np.testing.assert_array_equal(target["labels"].numpy(), record.labels)


@pytest.mark.parametrize("flip", ["hflip", "vflip"])
def test_forced_flip_mirrors_boxes_and_masks(cort, cort_masks, flip, augment_only):
    ds = DetectionDataset([cort], build_transforms(augment_only(**{flip: 1.0}), train=True), with_masks=True)
    image, target = ds[0]
    boxes = cort.boxes
    if flip == "hflip":
        expected = np.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], axis=1)
        np.testing.assert_array_equal(target["masks"].dense().numpy(), cort_masks[:, :, ::-1])
        np.testing.assert_allclose(image[0].numpy(), read_image(cort.path)[:, ::-1] / 255.0, atol=1e-6)
    else:
        expected = np.stack([boxes[:, 0], H - boxes[:, 3], boxes[:, 2], H - boxes[:, 1]], axis=1)
        np.testing.assert_array_equal(target["masks"].dense().numpy(), cort_masks[:, ::-1, :])
    np.testing.assert_array_equal(target["boxes"].numpy(), expected)
    np.testing.assert_array_equal(target["labels"].numpy(), cort.labels)


def test_rotation_gives_tight_boxes_of_the_rotated_masks(cort, cort_masks, augment_only, tight_boxes):
    cfg = augment_only(shift_scale_rotate={"p": 1.0, "rotate": 40, "shift": 0.02, "scale": 0.05})
    torch.manual_seed(0)
    _, target = DetectionDataset([cort], build_transforms(cfg, True), with_masks=True)[0]
    masks, boxes = target["masks"].dense().numpy(), target["boxes"].numpy()
    assert len(masks) == len(boxes) == len(target["labels"]) > 25
    assert not np.array_equal(masks, cort_masks[: len(masks)])
    np.testing.assert_array_equal(boxes, tight_boxes(masks))
    # the same draw without masks in the target gives the same boxes
    torch.manual_seed(0)
    _, plain = DetectionDataset([cort], build_transforms(cfg, True))[0]
    assert "masks" not in plain
    np.testing.assert_array_equal(plain["boxes"].numpy(), boxes)
    # the cells moved with the image (rotation + <=5% scale; corners may cut a few cells)
    assert 0.7 < masks.sum() / cort_masks.sum() < 1.15
    assert (masks.sum((1, 2)) >= 4).all()


class Shift(v2.Transform):
    """A deterministic translation by (dx, dy) pixels (test helper)."""

    def __init__(self, dx: float, dy: float) -> None:
        super().__init__()
        self.dx, self.dy = dx, dy

    def transform(self, inpt, params):
        return self._call_kernel(
            F.affine, inpt, angle=0.0, translate=[self.dx, self.dy], scale=1.0, shear=[0.0, 0.0]
        )


@pytest.fixture
def border_record(tmp_path, tight_boxes) -> ImageRecord:
    """64x96 textured image, cell 0 (label 2) touching the right border, cell 1 (label 1) centred."""
    rng = np.random.default_rng(0)
    image = rng.integers(60, 100, (64, 96), dtype=np.uint8)
    masks = np.zeros((2, 64, 96), dtype=bool)
    cv2.ellipse(masks[0].view(np.uint8), (90, 20), (5, 8), 0, 0, 360, 1, -1)
    cv2.ellipse(masks[1].view(np.uint8), (40, 32), (10, 6), 30, 0, 360, 1, -1)
    image[masks.any(0)] = 200
    path = tmp_path / "border.png"
    cv2.imwrite(str(path), image)
    return ImageRecord(
        image_id="border",
        path=path,
        height=64,
        width=96,
        cell_type="cort",
        boxes=tight_boxes(masks),
        labels=np.array([2, 1], dtype=np.int64),
        segmentations=[rle_encode(m) for m in masks],
        seg_format="rle",
    )


def test_instance_shifted_out_is_dropped_with_its_label(border_record):
    masks = border_record.masks()
    ds = DetectionDataset([border_record], Shift(12, 0), with_masks=True)
    _, target = ds[0]
    assert target["labels"].tolist() == [1]
    assert target["boxes"].shape == (1, 4) and target["masks"].dense().shape == (1, 64, 96)
    np.testing.assert_array_equal(target["masks"].dense()[0].numpy(), np.roll(masks[1], 12, axis=1))
    np.testing.assert_array_equal(
        target["boxes"].numpy(), border_record.boxes[1:] + np.float32([12, 0, 12, 0])
    )
    # a smaller shift cuts cell 0 at the border: its box is clipped to the image
    _, target = DetectionDataset([border_record], Shift(6, 0))[0]
    assert target["labels"].tolist() == [2, 1]
    assert target["boxes"][0, 2] == 96 and target["boxes"][0, 0] == border_record.boxes[0, 0] + 6
    # shifted out of the image entirely: no instances, but well-formed empty targets
    _, target = DetectionDataset([border_record], Shift(0, 70), with_masks=True)[0]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["masks"].dense().shape == (0, 64, 96)
    # slivers below min_area / min_size are dropped too
    _, target = DetectionDataset([border_record], Shift(10, 0), min_size=3)[0]
    assert target["labels"].tolist() == [1]


@pytest.mark.parametrize(
    "op",
    [
        {"brightness_contrast": {"p": 1.0}},
        {"gaussian_blur": {"p": 1.0, "sigma": [1.0, 2.0]}},
        {"median_blur": {"p": 1.0}},
    ],
)
def test_image_only_transforms_keep_boxes_and_masks(cort, cort_masks, op, augment_only):
    pipeline = build_transforms(augment_only(**op), train=True)
    assert not pipeline.geometric
    torch.manual_seed(0)
    image, target = DetectionDataset([cort], pipeline, with_masks=True)[0]
    original = read_image(cort.path) / 255.0
    assert np.abs(image[0].numpy() - original).mean() > 1e-3
    np.testing.assert_array_equal(target["boxes"].numpy(), cort.boxes)
    np.testing.assert_array_equal(target["masks"].dense().numpy(), cort_masks.astype(np.uint8))
    np.testing.assert_array_equal(target["labels"].numpy(), cort.labels)


def test_resize_scales_boxes(cort):
    # exact for an integer up-scale (both axes x2)
    ds = DetectionDataset([cort], build_transforms({"resize": [2 * H, 2 * W]}, train=False))
    image, target = ds[0]
    assert image.shape == (3, 2 * H, 2 * W)
    np.testing.assert_array_equal(target["boxes"].numpy(), cort.boxes * 2)
    # different factors per axis (y x0.5, x x1.25): within pixel rounding of the scaled box
    image, target = DetectionDataset([cort], build_transforms({"resize": [H // 2, 880]}, train=False))[0]
    assert image.shape == (3, H // 2, 880)
    expected = cort.boxes * np.array([1.25, 0.5, 1.25, 0.5], dtype=np.float32)
    assert len(target["boxes"]) == len(cort.boxes)
    assert np.abs(target["boxes"].numpy() - expected).max() <= 1.0


def test_determinism_under_seed(real_records):
    ds = DetectionDataset(real_records[:3], build_transforms({}, train=True))
    draws = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        draws.append([ds[i] for i in range(3)])
    for (ia, ta), (ib, tb) in zip(draws[0], draws[1], strict=True):
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])
        assert torch.equal(ta["labels"], tb["labels"])
    assert any(not torch.equal(a[0], c[0]) for a, c in zip(draws[0], draws[2], strict=True))


@pytest.fixture
def livecell_records(real_root, tmp_path):
    """A LIVECell COCO file with polygon cells over the real A172 image, read by the real reader."""
    name = "A172_Phase_A7_1_00d00h00m_1.tif"
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    shutil.copy(real_root / "livecell" / name, image_dir / name)
    polygons = [
        [[100.0, 100.0, 160.5, 110.0, 150.0, 170.0, 95.0, 150.0]],
        [[600.0, 20.0, 650.0, 30.0, 640.0, 80.0]],
        [[300.0, 400.0, 340.0, 400.0, 340.0, 430.0, 300.0, 430.0]],
    ]
    annotations = []
    for k, poly in enumerate(polygons):
        xs, ys = poly[0][0::2], poly[0][1::2]
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        annotations.append({"id": k + 1, "image_id": 7, "bbox": bbox, "segmentation": poly})
    coco = {
        "images": [{"id": 7, "file_name": name, "height": H, "width": W}],
        "annotations": {str(a["id"]): a for a in annotations},
    }
    json_path = tmp_path / "livecell_coco_train.json"
    json_path.write_text(json.dumps(coco))
    return read_livecell_coco(json_path, image_dir), polygons


def test_livecell_polygon_record_goes_through_the_same_path(livecell_records, augment_only, tight_boxes):
    records, polygons = livecell_records
    (record,) = records
    label = LIVECELL_CLASS_TO_LABEL["a172"]
    expected_masks = np.stack([polygons_to_mask(p, H, W) for p in polygons]).astype(np.uint8)

    image, target = DetectionDataset(records, with_masks=True)[0]
    assert image.shape == (3, H, W)
    np.testing.assert_array_equal(target["boxes"].numpy(), record.boxes)  # the COCO boxes
    assert target["labels"].tolist() == [label] * 3
    np.testing.assert_array_equal(target["masks"].dense().numpy(), expected_masks)

    _, target = DetectionDataset(records, build_transforms(augment_only(hflip=1.0), True), with_masks=True)[0]
    np.testing.assert_array_equal(target["masks"].dense().numpy(), expected_masks[:, :, ::-1])
    np.testing.assert_array_equal(target["boxes"].numpy(), tight_boxes(expected_masks[:, :, ::-1]))
    assert target["labels"].tolist() == [label] * 3
    # without masks, a flip maps the COCO boxes themselves: [x0, x1] -> [W - x1, W - x0]
    _, target = DetectionDataset(records, build_transforms(augment_only(hflip=1.0), True))[0]
    b = record.boxes
    np.testing.assert_array_equal(
        target["boxes"].numpy(), np.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], 1)
    )
    # a rotation takes the tight boxes of the rotated rasterised polygons
    cfg = augment_only(shift_scale_rotate={"p": 1.0, "rotate": 30})
    torch.manual_seed(0)
    _, target = DetectionDataset(records, build_transforms(cfg, True), with_masks=True)[0]
    np.testing.assert_array_equal(target["boxes"].numpy(), tight_boxes(target["masks"].dense().numpy()))

    torch.manual_seed(0)
    _, target = DetectionDataset(records, build_transforms({}, True))[0]
    assert target["boxes"].shape[1] == 4 and len(target["boxes"]) == len(target["labels"])


def test_labels_from(livecell_records, cort):
    records, _ = livecell_records
    assert DetectionDataset(records, labels_from="agnostic")[0][1]["labels"].tolist() == [1, 1, 1]
    a172 = LIVECELL_CLASS_TO_LABEL["a172"]
    assert DetectionDataset(records, labels_from={a172: 3})[0][1]["labels"].tolist() == [3, 3, 3]
    _, target = DetectionDataset(records, labels_from={a172: 0}, with_masks=True)[0]
    assert target["boxes"].shape == (0, 4) and target["masks"].dense().shape == (0, H, W)
    with pytest.raises(DataError, match="not in labels_from"):
        DetectionDataset([cort], labels_from={1: 1})[0]
    with pytest.raises(ValueError):
        DetectionDataset([cort], labels_from="cells")


def test_records_without_instances_or_segmentations(real_root, cort, augment_only):
    empty = ImageRecord(image_id="e", path=cort.path, height=H, width=W)
    for transforms in (None, build_transforms({}, True)):
        image, target = DetectionDataset([empty], transforms, with_masks=True)[0]
        assert image.shape == (3, H, W)
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert target["masks"].dense().shape == (0, H, W)
    boxes_only = ImageRecord(
        image_id="b",
        path=cort.path,
        height=H,
        width=W,
        boxes=np.array([[10, 10, 50, 40], [690, 500, 704, 520]], np.float32),
        labels=np.array([1, 2]),
    )
    _, target = DetectionDataset([boxes_only])[0]
    np.testing.assert_array_equal(target["boxes"].numpy(), boxes_only.boxes)
    _, target = DetectionDataset([boxes_only], build_transforms(augment_only(hflip=1.0), True))[0]
    np.testing.assert_array_equal(target["boxes"].numpy(), [[654, 10, 694, 40], [0, 500, 14, 520]])
    _, target = DetectionDataset([boxes_only], Shift(30, 0))[0]
    assert target["labels"].tolist() == [1]  # the box pushed out is dropped
    with pytest.raises(DataError, match="no segmentations"):
        DetectionDataset([boxes_only], with_masks=True)[0]
    wrong_size = ImageRecord(image_id="w", path=cort.path, height=256, width=256)
    with pytest.raises(DataError, match="expected"):
        DetectionDataset([wrong_size])[0]


def test_image_cache(real_records):
    ds = DetectionDataset(real_records[:1], image_cache=True)
    a, _ = ds[0]
    assert 0 in ds.source._cache
    b, _ = ds[0]
    assert torch.equal(a, b)


def test_unlabeled_dataset(real_root, augment_only):
    from cellmask.data.sartorius import list_images

    records = list_images(real_root / "test")
    ds = UnlabeledDataset(records, transforms=build_transforms(augment_only(hflip=1.0), True))
    image, index = ds[1]
    assert index == 1 and image.shape == (3, H, W) and image.dtype == torch.float32
    np.testing.assert_allclose(image[2].numpy(), read_image(records[1].path)[:, ::-1] / 255.0, atol=1e-6)
    assert isinstance(UnlabeledDataset(records)[0][0], torch.Tensor)
    assert type(UnlabeledDataset(records)[0][0]) is torch.Tensor  # not a tv_tensors subclass
    assert not isinstance(image, tv_tensors.TVTensor)


def test_dataloader_with_collate(real_records, augment_only):
    ds = DetectionDataset(real_records[:3], build_transforms(augment_only(hflip=0.5), True))
    loader = DataLoader(ds, batch_size=2, shuffle=False, num_workers=0, collate_fn=collate)
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [2, 1]
    images, targets = batches[0]
    assert isinstance(images, list) and isinstance(targets, list)
    assert all(im.shape == (3, H, W) for im in images)
    assert [t["image_id"] for t in targets] == [0, 1]
    assert collate([]) == ([], [])


def test_mask_windows_hold_each_mask_in_its_tight_box(real_records, augment_only):
    """The with_masks target: MaskWindows equal to ``from_dense`` of the full stack (windows,
    order, values), through a DataLoader too; empty and all-zero masks get empty windows."""
    from cellmask.data.layers import layers_from_indices, layers_to_masks, layers_to_windows

    (record,) = [r for r in real_records if r.image_id == "de504eaa5349"]  # overlaps, a duplicate
    layers = layers_from_indices([record.indices(i) for i in range(len(record))], H, W)
    assert len(layers) > 1
    index = torch.tensor([7, 3, 495, 0, 250])  # any order: window j is instance index[j]
    windows = layers_to_windows(layers, index)
    dense = layers_to_masks(layers, len(record))[index]
    expected = MaskWindows.from_dense(dense)
    assert torch.equal(windows.boxes, expected.boxes) and torch.equal(windows.data, expected.data)
    assert torch.equal(windows.dense(), dense) and windows.image_size == (H, W)
    for j, i in enumerate(index.tolist()):
        x0, y0, x1, y1 = windows.boxes[j].tolist()
        assert [x0, y0, x1, y1] == record.boxes[i].tolist()
        assert windows.window(j).shape == (y1 - y0, x1 - x0) and windows.window(j).sum() == dense[j].sum()
    # an all-zero mask: box [0, 0, 0, 0], no pixels; no instance at all: well-formed and empty
    blank = MaskWindows.from_dense(torch.cat([dense[:1], torch.zeros((1, H, W), dtype=torch.uint8)]))
    assert blank.boxes[1].tolist() == [0, 0, 0, 0] and blank.window(1).shape == (0, 0)
    assert torch.equal(blank.dense()[1], torch.zeros((H, W), dtype=torch.uint8))
    assert len(MaskWindows.empty((H, W))) == 0 and MaskWindows.empty((H, W)).dense().shape == (0, H, W)
    assert len(layers_to_windows(layers, torch.zeros(0, dtype=torch.long))) == 0
    moved = windows.to("meta")
    assert moved.boxes.device.type == moved.data.device.type == "meta" and moved.image_size == (H, W)

    ds = DetectionDataset([record], build_transforms(augment_only(hflip=0.5), True), with_masks=True)
    loader = DataLoader(ds, batch_size=1, num_workers=0, collate_fn=collate)
    (_, (target,)) = next(iter(loader))
    assert isinstance(target["masks"], MaskWindows) and len(target["masks"]) == len(target["boxes"])
    assert target["masks"].data.numel() < H * W  # 496 cells in less than one image (dense: 496)


def test_augment_by_type_gives_astrocytes_larger_windows(real_records):
    """augment.by_type: each cell type's images get their own pipeline (the cpu profile: astro
    images train on 384x384 windows, the others on 256x256)."""
    from cellmask.data.transforms import build_transforms, build_type_transforms

    augment = {"crop": [256, 256], "hflip": 0.0, "vflip": 0.0, "shift_scale_rotate": None,
               "brightness_contrast": None, "gaussian_blur": None, "median_blur": None,
               "by_type": {"astro": {"crop": [384, 384]}}}  # fmt: skip
    typed = build_type_transforms(augment, train=True)
    assert set(typed) == {"astro"}
    dataset = DetectionDataset(real_records, build_transforms(augment, train=True), type_transforms=typed)
    sizes = {r.cell_type: tuple(dataset[i][0].shape[-2:]) for i, r in enumerate(real_records)}
    assert sizes == {"astro": (384, 384), "cort": (256, 256), "shsy5y": (256, 256)}
    assert build_type_transforms({"crop": [256, 256]}, train=True) == {}
    with pytest.raises(ValueError, match="by_type must map cell types"):
        build_type_transforms({"by_type": {"astro": 3}}, train=True)
