"""[22]'s (Soft Teacher's) default view pipelines on our canvas (cellmask.data.semi.pipelines,
randaug): the resize as a content scale, box consistency under translate/rotate/shear, the
teacher's view never cropped, colour ops on gray images, cutout on the resized image, the
labeled pipeline's exact boxes, and the smaller cpu/demo/smoke views left as they were."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from cellmask.config import deep_merge, load_config
from cellmask.data.semi import (
    COMPACT_VIEWS,
    DEFAULT_SEMI_DATA,
    TwoViewDataset,
    build_labeled_transforms,
    draw_view,
    erase_patches,
    load_unlabeled,
    relative_matrix,
    render_view,
    sample_view,
    transform_boxes,
    warp_image,
)
from cellmask.data.semi.pipelines import draw_geometric, draw_resize_scale, resize_scale_range
from cellmask.data.semi.randaug import COLOR_OPS, apply_color, enhance_factor

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "soft_teacher_resnext101.yaml"
WEAK, STRONG, LABELED = DEFAULT_SEMI_DATA["weak"], DEFAULT_SEMI_DATA["strong"], DEFAULT_SEMI_DATA["labeled"]
H, W = 96, 128
RECT = (52.0, 40.0, 76.0, 56.0)  # x0, y0, x1, y1 pixel edges: a bright rectangle near the centre


def _rect_image() -> np.ndarray:
    image = np.zeros((H, W), dtype=np.uint8)
    x0, y0, x1, y1 = (int(v) for v in RECT)
    image[y0:y1, x0:x1] = 255
    return image


def _pixel_box(view: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(view > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def test_resize_is_the_train_over_test_factor_of_randresize():
    # 520x704: train factor min(1333 / 704, short / 520), short ~ randint(400, 1200); test factor
    # min(1333 / 704, 800 / 520) = 800 / 520; the 1333 cap bites for short >= 984
    lo, hi = resize_scale_range(WEAK["rand_resize"], 520, 704)
    assert lo == pytest.approx(400 / 800) and hi == pytest.approx((1333 / 704) / (800 / 520))
    torch.manual_seed(0)
    draws = np.array([draw_resize_scale(WEAK["rand_resize"], 520, 704) for _ in range(4000)])
    assert lo - 1e-9 <= draws.min() and draws.max() <= hi + 1e-9
    assert abs(np.isclose(draws, hi).mean() - (1200 - 984 + 1) / 801) < 0.03  # the cap's mass
    assert abs((draws > 1).mean() - 400 / 801) < 0.03  # zoom-in: short > 800
    # the scale the detector sees changes: the content shrinks or grows inside the canvas
    torch.manual_seed(1)
    scales = {
        round(float(abs(np.linalg.det(draw_view(WEAK, 520, 704).matrix[:2, :2]))) ** 0.5, 3)
        for _ in range(20)
    }
    assert len(scales) > 5 and max(scales) <= 1.0


@pytest.mark.parametrize("op", ["translate_x", "translate_y", "rotate", "shear"])
def test_teacher_boxes_land_on_the_strong_view_under_every_geometric_op(op):
    """The teacher's box of a rendered rectangle, carried to the strong view by the matrices, is
    the box of the rectangle's four warped corners (tight to them) and holds every warped pixel."""
    image = _rect_image()
    strong_cfg = deep_merge(STRONG, {"color": None, "erase": None, "fill": 0})
    strong_cfg["geometric"]["ops"] = [op]
    torch.manual_seed(0)
    for _ in range(15):
        weak = draw_view(deep_merge(WEAK, {"fill": 0}), H, W)
        strong = draw_view(strong_cfg, H, W)
        assert strong.geometric == op
        # the teacher sees the rectangle's box in the weak view (axis-aligned: exact)
        teacher = transform_boxes(torch.tensor([RECT]), weak.matrix)
        weak_view = render_view(image, weak)
        np.testing.assert_allclose(_pixel_box(weak_view), teacher[0].numpy(), atol=1.0)
        mapped = transform_boxes(teacher, relative_matrix(weak.matrix, strong.matrix))[0].numpy()
        # tight: the box of the four corners warped into the strong view
        x0, y0, x1, y1 = RECT
        corners = strong.matrix @ np.array([[x0, x1, x0, x1], [y0, y0, y1, y1], [1, 1, 1, 1]])
        tight = [corners[0].min(), corners[1].min(), corners[0].max(), corners[1].max()]
        np.testing.assert_allclose(mapped, tight, atol=1e-3)
        # every pixel the warp puts down lies in the mapped box, which it reaches on every side
        strong_view = render_view(image, strong)
        if not (strong_view > 127).any():
            continue  # moved off the canvas
        pixels = _pixel_box(strong_view)
        clipped = np.clip(mapped, 0, [W, H, W, H])
        assert np.all(pixels[:2] >= clipped[:2] - 1.0) and np.all(pixels[2:] <= clipped[2:] + 1.0), (
            pixels,
            mapped,
        )
        np.testing.assert_allclose(pixels, clipped, atol=1.5)


def test_geometric_conventions_of_the_reference():
    frame = (10.0, 20.0, 110.0, 70.0)  # a resized image 100 x 50 placed at (10, 20)
    torch.manual_seed(0)
    cfg = {"ops": ["rotate"], "translate": [0.1, 0.1], "rotate": [30, 30], "shear": [30, 30]}
    _, rot = draw_geometric(cfg, frame)
    centre = rot @ np.array([60.0, 45.0, 1.0])
    right = rot @ np.array([70.0, 45.0, 1.0])
    np.testing.assert_allclose(centre[:2], [60.0, 45.0])  # about the resized image's centre
    assert right[1] > 45.0  # positive angles turn clockwise on screen (mmcv.imrotate)
    _, shear = draw_geometric({**cfg, "ops": ["shear"]}, frame)
    # RandShear's factor is tanh(angle in radians) (not tan); x: tanh(-x), then y: tanh(+y)
    sx, sy = math.tanh(-math.pi / 6), math.tanh(math.pi / 6)
    np.testing.assert_allclose(shear @ np.array([10.0, 20.0, 1.0]), [10.0, 20.0, 1.0])  # top-left fixed
    np.testing.assert_allclose(shear[:2, :2], [[1.0, sx], [sy, 1.0 + sx * sy]])
    _, tx = draw_geometric({**cfg, "ops": ["translate_x"]}, frame)
    _, ty = draw_geometric({**cfg, "ops": ["translate_y"]}, frame)
    assert tx[0, 2] == pytest.approx(10.0) and ty[1, 2] == pytest.approx(5.0)  # 0.1 x (w, h)


@pytest.mark.parametrize("size", [(520, 704), (704, 520), (H, W), (256, 256)])
def test_weak_view_never_crops_the_image(size):
    height, width = size
    torch.manual_seed(0)
    for _ in range(300):
        m = draw_view(WEAK, height, width).matrix
        x0, y0, x1, y1 = transform_boxes(torch.tensor([[0.0, 0.0, width, height]], dtype=torch.float64), m)[0]
        assert x0 >= -1e-3 and y0 >= -1e-3 and x1 <= width + 1e-3 and y1 <= height + 1e-3


def test_strong_view_reaches_past_the_canvas_and_both_orders_occur():
    torch.manual_seed(0)
    draws = [draw_view(STRONG, 520, 704) for _ in range(400)]
    zoomed = [d for d in draws if d.frame[2] - d.frame[0] > 704 + 1e-6]
    assert 0.35 < len(zoomed) / len(draws) < 0.65  # s > 1: a window of the resized image
    for d in zoomed:  # the window lies inside the resized image
        assert d.frame[0] <= 1e-6 and d.frame[2] >= 704 - 1e-6
    first = np.mean([d.color_first for d in draws])
    assert 0.4 < first < 0.6  # ShuffledSequential: colour before or after the geometric op


def test_colour_ops_on_gray_equal_the_references_rgb_ops():
    """Each op on the L image is the reference's op on the gray image repeated to RGB; `color`
    is an identity on gray images; solarize and posterize follow the magnitude formulas."""
    rng = np.random.default_rng(0)
    gray = rng.integers(30, 200, (40, 50), dtype=np.uint8)
    rgb = Image.merge("RGB", [Image.fromarray(gray)] * 3)
    reference = {
        "autocontrast": lambda m: ImageOps.autocontrast(rgb),
        "equalize": lambda m: ImageOps.equalize(rgb),
        "color": lambda m: ImageEnhance.Color(rgb).enhance(enhance_factor(m)),
        "contrast": lambda m: ImageEnhance.Contrast(rgb).enhance(enhance_factor(m)),
        "brightness": lambda m: ImageEnhance.Brightness(rgb).enhance(enhance_factor(m)),
        "sharpness": lambda m: ImageEnhance.Sharpness(rgb).enhance(enhance_factor(m)),
        "posterize": lambda m: ImageOps.posterize(rgb, 4 - int(m * 4 / 10)),
    }
    for m in (1, 5, 9):
        for name, op in reference.items():
            expected = np.asarray(op(m))
            assert np.array_equal(expected[..., 0], expected[..., 2])  # stays gray
            assert np.array_equal(apply_color(gray, name, m), expected[..., 0]), (name, m)
        assert np.array_equal(apply_color(gray, "color", m), gray)
        assert np.array_equal(apply_color(gray, "identity", m), gray)
        threshold = min(int(m * 256 / 10), 255)  # mmcv.solarize
        assert np.array_equal(apply_color(gray, "solarize", m), np.where(gray < threshold, gray, 255 - gray))
    assert set(COLOR_OPS) == {"identity", *reference, "solarize"}
    assert enhance_factor(1) == pytest.approx(0.28) and enhance_factor(9) == pytest.approx(1.72)


def test_erase_on_the_resized_image_frame():
    torch.manual_seed(0)
    image = torch.full((1, 100, 200), 200, dtype=torch.uint8)
    frame = (50.0, 25.0, 150.0, 75.0)  # a resized image of 100 x 50
    for _ in range(20):
        out = erase_patches(image, count=(1, 1), size=(0.2, 0.2), fill=125, shape="image", frame=frame)
        ys, xs = np.nonzero(out[0].numpy() == 125)
        # one patch of int(0.2 h) x int(0.2 w) = 10 x 20 (the frame's aspect), inside the frame
        assert len(ys) == 10 * 20 and ys.min() >= 25 and ys.max() < 75 and xs.min() >= 50 and xs.max() < 150
    counts = set()
    for _ in range(200):  # RandErase(n_iterations=(1, 5)): randint -> 1..4 patches
        out = erase_patches(
            torch.zeros((1, 400, 400)), count=(1, 4), size=(0.01, 0.01), fill=1, shape="image"
        )
        counts.add(int(out.sum()) // 16)
    assert counts == {1, 2, 3, 4}


def _write_rect(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / "rect.png"), _rect_image())


def test_two_view_items_are_reproducible_renders_of_their_draws(tmp_path: Path):
    _write_rect(tmp_path / "train_semi_supervised")
    ds = TwoViewDataset(load_unlabeled(tmp_path))  # the defaults: [22]'s pipelines
    original = _rect_image()
    torch.manual_seed(5)
    item = ds[0]
    torch.manual_seed(5)
    again = ds[0]
    assert all(torch.equal(item[k], again[k]) for k in ("weak", "strong", "weak_matrix", "strong_matrix"))
    expected = warp_image(original, item["weak_matrix"].numpy(), 125)  # weak: resize + flip only
    assert torch.equal(item["weak"][0], torch.from_numpy(expected).float().div(255))
    assert item["strong"].shape == (3, H, W)


def test_labeled_pipeline_boxes_are_the_warped_masks_tight_boxes(real_records, tight_boxes):
    from cellmask.data.datasets import DetectionDataset

    record = min(real_records, key=len)
    ds = DetectionDataset([record], build_labeled_transforms(LABELED), with_masks=True)
    torch.manual_seed(0)
    sizes = set()
    for _ in range(4):
        image, target = ds[0]
        assert image.shape == (3, record.height, record.width)  # the canvas keeps its size
        masks = target["masks"]  # MaskWindows: each warped mask cropped to its own tight box
        windows = masks.boxes.numpy() if hasattr(masks, "boxes") else tight_boxes(masks.numpy())
        assert len(windows) and np.array_equal(target["boxes"].numpy(), windows.astype(np.float32))
        sizes.add(float(np.median((windows[:, 2] - windows[:, 0]) * (windows[:, 3] - windows[:, 1]))))
    assert len(sizes) > 1  # the cells' size changes with the drawn scale


def test_cpu_demo_smoke_profiles_keep_the_smaller_views():
    old_weak = {"hflip": 0.5, "vflip": 0.5, "scale": [0.8, 1.0], "shift": 0.0, "fill": 0}
    old_strong = {
        "hflip": 0.5,
        "vflip": 0.5,
        "scale": [0.8, 1.2],
        "shift": 0.1,
        "fill": 0,
        "brightness_contrast": {"p": 0.8, "brightness": 0.3, "contrast": 0.3},
        "gaussian_blur": {"p": 0.5, "kernel": 5, "sigma": [0.1, 2.0]},
        "erase": {"p": 0.7, "count": [1, 5], "size": [0.05, 0.2]},
    }
    new_keys_off = {"rand_resize": None, "color": None, "geometric": None, "max_scale": None}
    for profile in ("cpu", "demo", "smoke"):
        semi = load_config(CONFIG, profile=profile)["semi"]
        assert semi["labeled"] is None  # labeled images take augment:
        assert {k: semi["weak"][k] for k in old_weak} == old_weak
        assert {k: semi["strong"][k] for k in old_strong if k != "erase"} == {
            k: v for k, v in old_strong.items() if k != "erase"
        }
        assert {k: semi["strong"]["erase"][k] for k in old_strong["erase"]} == old_strong["erase"]
        assert semi["strong"]["erase"]["shape"] == "square"
        for view in ("weak", "strong"):
            assert all(semi[view].get(k, None) is None for k in new_keys_off), (profile, view)
            assert semi[view] == COMPACT_VIEWS[view]
    # and they draw exactly what they drew before: the old sample_view sequence
    weak, strong = COMPACT_VIEWS["weak"], COMPACT_VIEWS["strong"]
    torch.manual_seed(3)
    drawn = [draw_view(weak, H, W).matrix, draw_view(strong, H, W).matrix]
    torch.manual_seed(3)
    old = [sample_view(old_weak, H, W), sample_view(old_strong, H, W)]
    assert all(np.array_equal(a, b) for a, b in zip(drawn, old, strict=True))
