"""The segmentation module (cellmask.models.segmenter): paste geometry, model, training, CLI."""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cellmask.config import load_config
from cellmask.data.crops import CropDataset, crop_masks, crop_rois, instance_pixels, jitter_boxes
from cellmask.data.datasets import collate
from cellmask.models.segmenter import (
    PastedMasks,
    Segmenter,
    build_segmenter,
    evaluate_segmenter,
    instance_ious,
    paste_masks,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "segmenter_upernet_swin_t.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


def smoke_cfg(**overrides) -> dict:
    return load_config(CONFIG, "smoke", overrides=overrides or None)


# ------------------------------------------------------------------------------ geometry

MIN_AREA = 100
"""Cut-off of the round-trip bound: below ~100 px a single resampled pixel costs > 1% IoU and the
thinnest real cells (a few pixels wide) are at the mercy of one pixel; the real fixture's
smallest cells (46 px) pass anyway, the cut-off only keeps the test about geometry, not luck."""


def _round_trip_ious(records, jitter: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(binary-path IoUs, identity-model-path IoUs, areas) of every real instance cropped at its
    box (or an enlarged jittered box) with aligned RoIAlign and pasted back at that box."""
    binary, soft, areas = [], [], []
    gen = torch.Generator().manual_seed(0)
    for record in records:
        pixels = [instance_pixels(record, i) for i in range(len(record))]
        boxes = torch.as_tensor(record.boxes)
        if jitter:  # only enlarging: a shrunk box would cut the mask itself
            boxes = jitter_boxes(
                boxes, (1.0, 1.3), 0.1, image_size=(record.height, record.width), generator=gen
            )
            grown = torch.cat([torch.minimum(boxes[:, :2], torch.as_tensor(record.boxes[:, :2])),
                               torch.maximum(boxes[:, 2:], torch.as_tensor(record.boxes[:, 2:]))], 1)  # fmt: skip
            boxes = grown
        soft_crops = crop_masks(pixels, boxes, size=128)
        size = (record.height, record.width)
        for probs, out in (((soft_crops >= 0.5).float(), binary), (soft_crops, soft)):
            pasted, _ = paste_masks(probs, boxes, size, threshold=0.5, dense=False)
            out.append(instance_ious(pasted, pixels))
        areas.append(np.array([len(p[0]) for p in pixels]))
    return np.concatenate(binary), np.concatenate(soft), np.concatenate(areas)


@pytest.mark.parametrize("jitter", [False, True], ids=["own_box", "enlarged_box"])
def test_crop_then_paste_recovers_every_real_mask(real_records, jitter):
    """All 1167 real instances: crop at the box, threshold, paste back -> IoU >= 0.9 for every
    instance of >= MIN_AREA pixels, and the mean close to 1. Same through the identity "model"
    (the soft crop as the probability map)."""
    binary, soft, areas = _round_trip_ious(real_records, jitter)
    assert len(areas) == 1167
    big = areas >= MIN_AREA
    for ious in (binary, soft):
        assert ious[big].min() >= 0.9
        assert ious.min() >= 0.8
        assert ious.mean() >= 0.995


def test_paste_maps_cells_onto_exactly_the_box():
    """A box of S x S whole pixels gets cell (p, q) at pixel (y0 + p, x0 + q); a 2S box gets each
    cell on 2 x 2 pixels; a half-pixel offset box moves by the nearest pixel centres."""
    s = 8
    probs = (torch.rand(1, 1, s, s, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    masks, conf = paste_masks(probs, torch.tensor([[5.0, 3.0, 5.0 + s, 3.0 + s]]), (20, 30))
    assert masks.shape == (1, 20, 30) and masks.dtype == torch.bool
    assert torch.equal(masks[0, 3 : 3 + s, 5 : 5 + s], probs[0, 0] > 0.5)
    assert masks[0].sum() == (probs > 0.5).sum()
    assert conf.item() == pytest.approx(1.0)

    masks2, _ = paste_masks(probs, torch.tensor([[4.0, 2.0, 4.0 + 2 * s, 2.0 + 2 * s]]), (30, 30))
    up = (probs[0, 0] > 0.5).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(masks2[0, 2 : 2 + 2 * s, 4 : 4 + 2 * s], up)
    assert masks2[0].sum() == up.sum()

    # the continuous box [5.4, 13.4]: pixel centres 5.5 .. 12.5 -> columns 5..12, still 1:1
    masks3, _ = paste_masks(probs, torch.tensor([[5.4, 3.0, 5.4 + s, 3.0 + s]]), (20, 30))
    assert torch.equal(masks3[0, 3 : 3 + s, 5 : 5 + s], probs[0, 0] > 0.5)


def test_paste_threshold_confidence_and_compact_form():
    probs = torch.linspace(0, 1, 16 * 16).reshape(1, 1, 16, 16).repeat(3, 1, 1, 1)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [10.0, 10.0, 26.0, 26.0], [2.0, 30.0, 18.0, 46.0]])
    dense, conf = paste_masks(probs, boxes, (40, 40), threshold=0.75)
    kept = probs[0, 0][probs[0, 0] >= 0.75]
    assert dense[0].sum() == len(kept)
    assert conf[0].item() == pytest.approx(kept.mean().item(), abs=1e-6)
    compact, conf2 = paste_masks(probs, boxes, (40, 40), threshold=0.75, dense=False)
    assert isinstance(compact, PastedMasks) and len(compact) == 3
    assert torch.equal(compact.dense(), dense) and torch.equal(conf, conf2)
    assert (
        torch.equal(compact.mask(1), dense[1])
        and compact.areas().tolist() == dense.flatten(1).sum(1).tolist()
    )
    # box 2 leaves the image at the bottom (rows 30..45 of 40): clipped, and what is inside matches
    assert compact.windows[2].shape == (10, 16)
    assert torch.equal(dense[2, 30:40, 2:18], probs[2, 0, :10] >= 0.75)
    empty, conf0 = paste_masks(torch.zeros(0, 1, 16, 16), torch.zeros(0, 4), (40, 40))
    assert empty.shape == (0, 40, 40) and conf0.shape == (0,)


def test_paste_handles_border_tiny_and_outside_boxes():
    ones = torch.ones(5, 1, 16, 16)
    boxes = torch.tensor(
        [
            [-5.0, -5.0, 10.0, 10.0],  # sticks out top-left
            [25.0, 15.0, 40.0, 30.0],  # touches/leaves bottom-right of a 20 x 30 image
            [7.2, 4.1, 7.6, 4.4],  # smaller than a pixel, holds no pixel centre
            [40.0, 40.0, 50.0, 50.0],  # entirely outside
            [3.0, 3.0, 3.0, 3.0],  # degenerate
        ]
    )
    masks, conf = paste_masks(ones, boxes, (20, 30))
    assert masks[0].sum() == 10 * 10 and masks[0, :10, :10].all()
    assert masks[1].sum() == 5 * 5 and masks[1, 15:, 25:].all()
    assert masks[2].sum() == 1 and masks[2, 4, 7]
    assert masks[3].sum() == 0 and conf[3] == 0
    assert masks[4].sum() == 1 and masks[4, 3, 3]
    assert torch.isfinite(conf).all()


# ------------------------------------------------------------------------------ model


def test_paper_segmenter_is_upernet_swin_t():
    cfg = load_config(CONFIG, "paper", overrides={"model": {"backbone": {"pretrained": False}}})
    model = build_segmenter(cfg["model"])
    encoder = sum(p.numel() for p in model.net.encoder.parameters())
    assert encoder == pytest.approx(27.5e6, rel=0.01)  # Swin-T
    assert type(model.net).__name__ == "UPerNet"
    assert model.crop_size == 128 and model.net.segmentation_head[0].out_channels == 1
    assert model.net.decoder.fusion_block[0].out_channels == 512
    assert cfg["train"]["monitor"] == "val_mIoU" and cfg["train"]["optimizer"] == "adamw"
    assert model.class_dependent_prefixes() == ["net.segmentation_head."]
    with pytest.raises(ValueError, match="multiple of 32"):
        build_segmenter({**cfg["model"], "crop": {"size": 100}})
    with pytest.raises(ValueError, match="expected 'segmenter'"):
        build_segmenter({**cfg["model"], "type": "faster_rcnn"})


@pytest.fixture(scope="module")
def smoke_model() -> Segmenter:
    torch.manual_seed(0)
    return build_segmenter(smoke_cfg()["model"])


def test_forward_shapes_and_gray_input(smoke_model):
    s = smoke_model.crop_size
    x = torch.rand(3, 1, s, s)
    smoke_model.eval()
    with torch.no_grad():
        out1 = smoke_model(x)
        out3 = smoke_model(x.expand(-1, 3, -1, -1))
    assert out1.shape == (3, 1, s, s)
    torch.testing.assert_close(out1, out3)


def test_predict_is_batched_and_returns_masks_in_image_coordinates(smoke_model):
    h, w = 120, 160
    image = torch.rand(3, h, w)
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(600, 2, generator=gen) * torch.tensor([w - 20.0, h - 20.0])
    boxes = torch.cat([xy, xy + 4 + 16 * torch.rand(600, 2, generator=gen)], 1)
    calls = []
    handle = smoke_model.net.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        smoke_model.train()
        masks, conf = smoke_model.predict(image, boxes, batch_size=64)
    finally:
        handle.remove()
    assert len(calls) == math.ceil(600 / 64) and sum(calls) == 600
    assert smoke_model.training  # mode restored
    assert masks.shape == (600, h, w) and masks.dtype == torch.bool and conf.shape == (600,)
    # nothing outside its box
    for i in range(0, 600, 37):
        x0, y0, x1, y1 = boxes[i].tolist()
        ys, xs = torch.nonzero(masks[i], as_tuple=True)
        if len(ys):
            assert (
                xs.min() + 0.5 >= x0
                and xs.max() + 0.5 <= x1
                and ys.min() + 0.5 >= y0
                and ys.max() + 0.5 <= y1
            )
    # same result batched over images and one at a time
    many, conf_many = smoke_model.predict(torch.stack([image, image]), [boxes[:5], boxes[5:9]], dense=True)
    one, conf_one = smoke_model.predict(image, boxes[:9])
    assert torch.equal(many[0], one[:5]) and torch.equal(many[1], one[5:])
    torch.testing.assert_close(torch.cat(conf_many), conf_one)
    none, _ = smoke_model.predict((image[0] * 255).to(torch.uint8), torch.zeros(0, 4))
    assert none.shape == (0, h, w)


def test_training_step_losses_and_edge_batches(smoke_model):
    s = smoke_model.crop_size
    crops = [torch.rand(3, 1, s, s), torch.rand(2, 1, s, s)]
    targets = [{"masks": (c > 0.5).to(torch.uint8)} for c in crops]
    smoke_model.train()
    losses = smoke_model.training_step((crops, targets))
    assert set(losses) == {"loss_bce", "loss_dice"} and all(v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    one = smoke_model.training_step(([crops[1][:1]], [{"masks": targets[1]["masks"][:1]}]))
    sum(one.values()).backward()  # BatchNorm on one crop: duplicated, no error
    smoke_model.zero_grad(set_to_none=True)
    stats = {k: v.clone() for k, v in smoke_model.state_dict().items() if "running" in k}
    none = smoke_model.training_step(([torch.zeros(0, 1, s, s)], [{"masks": torch.zeros(0, 1, s, s)}]))
    assert set(none) == {"loss_bce", "loss_dice"} and all(v.item() == 0 for v in none.values())
    sum(none.values()).backward()  # zero loss still reaches every parameter (DDP), no BN update
    assert all(p.grad is not None and not p.grad.any() for p in smoke_model.parameters())
    assert all(torch.equal(v, smoke_model.state_dict()[k]) for k, v in stats.items())
    smoke_model.zero_grad()
    bce_only = build_segmenter({**smoke_cfg()["model"], "loss": {"bce": 1.0, "dice": 0}})
    assert set(bce_only.training_step((crops, targets))) == {"loss_bce"}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    from cellmask.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("seg_data")
    write_dataset(root, n_train=6, n_unlabeled=0, n_test=0, n_livecell=6, seed=0, size=(160, 208))
    return root


@pytest.mark.slow
def test_smoke_segmenter_overfits_a_few_synthetic_images(synthetic_root):
    """Truth boxes given, the smoke segmenter learns 3 synthetic images (46 cells, with jitter,
    flips and rotations on) to a mean mask IoU >= 0.8 in ~120 AdamW steps (~30 s on one core)."""
    from cellmask.data.sartorius import read_train_csv

    records = read_train_csv(synthetic_root / "train.csv", synthetic_root / "train")[:3]
    cfg = smoke_cfg()
    torch.manual_seed(0)
    model = build_segmenter(cfg["model"])
    ds = CropDataset(records, cfg["crops"], size=model.crop_size, image_cache=True)
    steps, lr = 120, 3e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    before = evaluate_segmenter(model, records)["mIoU"]
    history = []
    for _ in range(steps):
        model.train()
        losses = model.training_step(collate([ds[i] for i in range(len(ds))]))
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
    after = evaluate_segmenter(model, records)
    assert np.mean(history[-10:]) < 0.5 * np.mean(history[:10])
    print(
        f"mIoU {before:.3f} -> {after['mIoU']:.3f}, loss {np.mean(history[:10]):.3f} -> {np.mean(history[-10:]):.3f}"
    )
    assert after["mIoU"] >= 0.8 > before


def test_fit_runs_the_segmenter_and_checkpoints_load_weights_only(synthetic_root, tmp_path):
    from cellmask.data.sartorius import read_train_csv
    from cellmask.engine import build_train_loader, fit

    records = read_train_csv(synthetic_root / "train.csv", synthetic_root / "train")
    cfg = smoke_cfg(**{"train": {"progress": False, "epochs": 1}})
    torch.manual_seed(0)
    model = build_segmenter(cfg["model"])
    ds = CropDataset(records[:4], cfg["crops"], size=model.crop_size)
    loader = build_train_loader(ds, cfg, collate)

    def val_fn(m, epoch):
        return evaluate_segmenter(m, records[4:], max_images=1)

    result = fit(model, loader, val_fn, cfg, tmp_path / "run", device="cpu")
    row = result["history"][0]
    assert {"train_loss_bce", "train_loss_dice", "val_mIoU"} <= set(row)
    assert result["best"]["metric"] == "val_mIoU"
    ckpt = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=True)
    fresh = build_segmenter(cfg["model"])
    fresh.load_state_dict(ckpt["model"])
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


@pytest.mark.slow
def test_train_command_livecell_then_init_on_competition(synthetic_root, tmp_path):
    """`cellmask train` with the segmenter config (smoke): LIVECell, then --init on the competition
    (same single output: every tensor carried over)."""
    from cellmask.train import add_train_arguments, cli_train, run_training

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    common = ["--config", str(CONFIG), "--data", str(synthetic_root), "--profile", "smoke", "--device", "cpu"]
    common += ["--set", "train.progress=false", "--epochs", "1"]
    args = parser.parse_args([*common, "--dataset", "livecell", "--out", str(tmp_path / "lc")])
    assert cli_train(args) == 0
    with (tmp_path / "lc" / "metrics.csv").open() as f:
        row = next(csv.DictReader(f))
    assert 0.0 <= float(row["val_mIoU"]) <= 1.0
    ckpt = torch.load(tmp_path / "lc" / "best.pt", weights_only=True)
    assert ckpt["config"]["model"]["type"] == "segmenter" and ckpt["config"]["data"]["dataset"] == "livecell"

    cfg = load_config(CONFIG, "smoke", overrides=["train.progress=false"])
    result = run_training(
        cfg,
        synthetic_root,
        "sartorius",
        tmp_path / "ft",
        init=tmp_path / "lc" / "best.pt",
        epochs=1,
        device="cpu",
    )
    report = result["init"]
    assert not report.reinitialized and not report.missing and not report.unexpected
    assert len(report.loaded) == len(ckpt["model"])
    assert (tmp_path / "ft" / "best.pt").is_file() and "val_mIoU" in result["history"][0]


def test_crops_of_the_dataset_feed_predict_consistently(smoke_model, synthetic_root):
    """The training crops (eval mode: tight boxes) are exactly what predict crops."""
    from cellmask.data.sartorius import read_train_csv

    record = read_train_csv(synthetic_root / "train.csv", synthetic_root / "train")[0]
    crops, target = CropDataset([record], size=smoke_model.crop_size, train=False)[0]
    image = torch.from_numpy(CropDataset([record]).read(0)).float()[None, None] / 255
    ref = crop_rois(image, [target["boxes"]], smoke_model.crop_size, smoke_model.sampling_ratio)
    torch.testing.assert_close(crops, ref)
