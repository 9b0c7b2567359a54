"""Overlay plotting: colours land on instance pixels, files have the image's pixel size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cellmask.plot import instance_colors, overlay_instances, overlay_rgb, save_overlay

H, W = 60, 90


@pytest.fixture()
def scene() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((H, W), 128, dtype=np.uint8)
    masks = np.zeros((3, H, W), dtype=bool)
    masks[0, 10:30, 10:30] = True
    masks[1, 25:45, 25:60] = True  # overlaps mask 0 a little
    masks[2, 40:55, 70:85] = True
    return image, masks


def _is_gray(pixel: np.ndarray) -> bool:
    return int(pixel.max()) - int(pixel.min()) <= 2


def test_instance_colors_are_deterministic_and_bright():
    a, b = instance_colors(20, seed=3), instance_colors(20, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (20, 3) and a.dtype == np.uint8
    assert (a.max(1) >= 150).all()
    assert not np.array_equal(a, instance_colors(20, seed=4))
    assert len({tuple(c) for c in a}) > 10


def test_overlay_rgb_colours_instances_only(scene):
    image, masks = scene
    out = overlay_rgb(image, masks, alpha=0.5)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert not _is_gray(out[20, 20]) and not _is_gray(out[50, 77])  # inside masks
    assert _is_gray(out[5, 5]) and out[5, 5, 0] == 128  # background untouched
    colours = instance_colors(3)
    np.testing.assert_array_equal(out[10, 15], colours[0])  # outline in the instance's colour
    no_contours = overlay_rgb(image, masks, alpha=0.5, contours=False)
    assert not np.array_equal(no_contours[10, 15], colours[0])
    assert np.array_equal(out, overlay_rgb(image, masks, alpha=0.5))  # deterministic


def test_overlay_rgb_accepts_label_image_and_no_instances(scene):
    image, masks = scene
    labels = np.zeros((H, W), dtype=np.int32)
    labels[masks[0]] = 1
    labels[masks[2]] = 2
    out = overlay_rgb(image, labels)
    assert not _is_gray(out[15, 15]) and _is_gray(out[5, 5])
    empty = overlay_rgb(image, np.zeros((0, H, W), dtype=bool))
    assert (empty == 128).all()
    with pytest.raises(ValueError, match="masks must be"):
        overlay_rgb(image, np.zeros((2, H + 1, W), dtype=bool))


def test_overlay_instances_renders_colour_on_a_new_figure(scene):
    image, masks = scene
    ax = overlay_instances(image, masks, title="three cells")
    fig = ax.figure
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    height, width = rgba.shape[:2]
    # the axes fill the figure: the centre of mask 2 maps to the same relative position
    y, x = int(47 / H * height), int(77 / W * width)
    assert not _is_gray(rgba[y, x, :3])
    y, x = int(5 / H * height), int(45 / W * width)
    assert _is_gray(rgba[y, x, :3])


def test_overlay_instances_draws_on_a_given_axes(scene):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image, masks = scene
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 2)
    assert overlay_instances(image, masks, ax=ax) is ax
    assert len(ax.images) == 1


def test_save_overlay_writes_a_png_of_the_image_size(scene, tmp_path):
    image, masks = scene
    path = save_overlay(tmp_path / "sub" / "overlay.png", image, masks, title="demo")
    assert path.is_file()
    written = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert written.shape[:2] == (H, W)
    # inside mask 2 (away from the title box at the top left): coloured; background stays gray
    assert not _is_gray(written[47, 77])
    assert _is_gray(written[55, 40])


def test_save_overlay_real_size(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(100, 156, (520, 704), dtype=np.uint8)
    masks = np.zeros((1, 520, 704), dtype=bool)
    masks[0, 200:260, 300:380] = True
    path = save_overlay(tmp_path / "big.png", image, masks)
    written = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert written.shape[:2] == (520, 704)
    b, g, r = written[230, 340].astype(int)
    assert max(b, g, r) - min(b, g, r) > 20
