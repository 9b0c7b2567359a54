"""Faster R-CNN (smoke Swin) + the detector registry: config wiring, anchors, training, overfitting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from cellmask import config
from cellmask.models import DETECTOR_TYPES, build_detector, register_detector
from cellmask.models.faster_rcnn import CellFasterRCNN, build_faster_rcnn

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMOKE_RESNEST_KWARGS = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}


def smoke_model_cfg(**changes) -> dict:
    """The smoke profile's ``model`` section of the Swin-T branch, with ``changes`` merged in."""
    cfg = config.load_config(CONFIGS / "faster_rcnn_swin_t.yaml", profile="smoke")["model"]
    return config.deep_merge(cfg, changes)


def resnest_cfg() -> dict:
    """ResNeSt-101 reduced, with its (frozen) BatchNorm, in the Faster R-CNN smoke model."""
    cfg = smoke_model_cfg(backbone={"name": "resnest101e", "frozen_stages": 1})
    cfg["backbone"]["kwargs"] = dict(SMOKE_RESNEST_KWARGS)
    return cfg


def synthetic_image(rng: np.random.Generator, h: int, w: int, n: int) -> tuple[torch.Tensor, dict]:
    """A textured gray background with ``n`` non-overlapping bright ellipses (label 1)."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.3 + 0.05 * rng.standard_normal((h, w)) + 0.05 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
    boxes: list[np.ndarray] = []
    while len(boxes) < n:
        a, b = rng.uniform(6, 14), rng.uniform(6, 14)
        cy, cx = rng.uniform(b + 2, h - b - 2), rng.uniform(a + 2, w - a - 2)
        inside = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
        box = np.array(
            [xx[inside].min(), yy[inside].min(), xx[inside].max() + 1, yy[inside].max() + 1], dtype=np.float32
        )
        if boxes and box_iou(torch.from_numpy(box)[None], torch.from_numpy(np.stack(boxes))).max() > 0:
            continue
        img[inside] = 0.85 + 0.05 * rng.standard_normal(int(inside.sum()))
        boxes.append(box)
    image = torch.tensor(np.clip(img, 0, 1), dtype=torch.float32)[None].repeat(3, 1, 1)
    return image, {"boxes": torch.from_numpy(np.stack(boxes)), "labels": torch.ones(n, dtype=torch.int64)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """Smoke Faster R-CNN (Swin) overfit on two 120x150 images (resized to 128x160 inside): ~10 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = [synthetic_image(rng, 120, 150, 5) for _ in range(2)]
    images, targets = [d[0] for d in data], [d[1] for d in data]
    model = build_detector(smoke_model_cfg(), num_classes=2)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    losses = []
    for _ in range(50):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    torch.set_num_threads(threads)
    return model, images, targets, losses


def test_registry_builds_faster_rcnn_with_config_settings():
    cfg = smoke_model_cfg(
        rpn={"pre_nms_top_n_train": 1500, "post_nms_top_n_test": 800, "nms_thresh": 0.65, "match_chunk": 333},
        roi={"score_thresh": 0.01, "nms_thresh": 0.4, "detections_per_img": 1200, "match_chunk": None},
        transform={"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "size_divisible": 64},
    )
    model = build_detector(cfg, num_classes=4)
    assert isinstance(model, CellFasterRCNN)
    assert model.roi_heads.detections_per_img == 1200
    assert model.roi_heads.score_thresh == 0.01 and model.roi_heads.nms_thresh == 0.4
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 16
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    assert model.roi_heads.box_roi_pool.output_size == (7, 7)
    assert model.roi_heads.box_roi_pool.sampling_ratio == 2
    assert model.roi_heads.box_head.fc7.out_features == 128
    assert model.rpn._pre_nms_top_n == {"training": 1500, "testing": 200}
    assert model.rpn._post_nms_top_n == {"training": 100, "testing": 800}
    assert model.rpn.nms_thresh == 0.65
    assert model.rpn.proposal_matcher.chunk == 333 and model.rpn.proposal_matcher.allow_low_quality_matches
    assert model.roi_heads.proposal_matcher.chunk is None
    assert model.transform.min_size == (128,) and model.transform.max_size == 160
    assert model.transform.image_mean == [0.5, 0.5, 0.5] and model.transform.image_std == [0.25, 0.25, 0.25]
    assert model.transform.size_divisible == 64


def test_caps_are_read_from_the_config():
    paper = config.load_config(CONFIGS / "faster_rcnn_swin_t.yaml")["model"]
    for changes in ({}, {"rpn": {"post_nms_top_n_test": 1234}, "roi": {"detections_per_img": 2345}}):
        cfg = config.deep_merge(smoke_model_cfg(), {"rpn": paper["rpn"], "roi": paper["roi"]})
        cfg = config.deep_merge(cfg, changes)
        model = build_faster_rcnn(cfg, num_classes=4)
        r, roi = cfg["rpn"], cfg["roi"]
        assert model.rpn._pre_nms_top_n == {
            "training": r["pre_nms_top_n_train"],
            "testing": r["pre_nms_top_n_test"],
        }
        assert model.rpn._post_nms_top_n == {
            "training": r["post_nms_top_n_train"],
            "testing": r["post_nms_top_n_test"],
        }
        assert model.roi_heads.detections_per_img == roi["detections_per_img"]
        assert model.roi_heads.fg_bg_sampler.batch_size_per_image == roi["batch_size_per_image"]
    # the paper's caps cover the densest LIVECell images (~3000 cells), not only the competition's
    assert paper["rpn"]["post_nms_top_n_test"] >= 3000 and paper["roi"]["detections_per_img"] >= 3000
    assert model.rpn._post_nms_top_n["testing"] == 1234 and model.roi_heads.detections_per_img == 2345


def test_every_value_comes_from_the_config():
    cfg = smoke_model_cfg()
    del cfg["rpn"]["nms_thresh"]
    with pytest.raises(ValueError, match=r"model\.rpn\.nms_thresh"):
        build_faster_rcnn(cfg, num_classes=4)
    cfg = smoke_model_cfg()
    del cfg["transform"]
    with pytest.raises(ValueError, match=r"model\.transform\.min_size"):
        build_detector(cfg, num_classes=4)
    with pytest.raises(ValueError, match="unknown key.*detection_per_img"):
        build_faster_rcnn(smoke_model_cfg(roi={"detection_per_img": 10}), num_classes=4)


def test_anchors_are_cell_sized():
    model = build_faster_rcnn(smoke_model_cfg(), num_classes=4)
    gen = model.rpn.anchor_generator
    assert gen.num_anchors_per_location() == [5] * 5
    cells = torch.cat([a for a in gen.cell_anchors])
    w, h = cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]
    sizes, ratios = torch.sqrt(w * h), h / w
    assert sizes.min().item() == pytest.approx(8.0)  # P2's square anchor is 8x8 px
    assert sizes.max().item() == pytest.approx(128.0, rel=0.05)
    assert ratios.min().item() == pytest.approx(0.25, rel=0.05)
    assert ratios.max().item() == pytest.approx(4.0, rel=0.05)
    assert [float(s[0]) for s in gen.sizes] == [8, 16, 32, 64, 128]
    assert gen.aspect_ratios[0] == (0.25, 0.5, 1.0, 2.0, 4.0)


def test_anchor_config_is_validated():
    with pytest.raises(ValueError, match="levels"):
        build_faster_rcnn(smoke_model_cfg(anchor={"sizes": [[8], [16]]}), num_classes=4)
    with pytest.raises(ValueError, match="same number of sizes"):
        build_faster_rcnn(
            smoke_model_cfg(anchor={"sizes": [[8, 16], [16], [32], [64], [128]]}), num_classes=4
        )


def test_class_dependent_prefixes_cover_exactly_the_class_shaped_weights():
    torch.manual_seed(0)
    four = build_detector(smoke_model_cfg(), num_classes=4)
    nine = build_detector(smoke_model_cfg(), num_classes=9)
    prefixes = four.class_dependent_prefixes()
    assert prefixes == nine.class_dependent_prefixes() == ["roi_heads.box_predictor."]
    s4, s9 = four.state_dict(), nine.state_dict()
    assert s4.keys() == s9.keys()
    differ = {k for k in s4 if s4[k].shape != s9[k].shape}
    assert differ == {k for k in s4 if k.startswith(tuple(prefixes))}
    assert differ  # the predictor's weights and biases


def test_unknown_type_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"cascade_mask_rcnn.*cascade_rcnn.*faster_rcnn"):
        build_detector({**smoke_model_cfg(), "type": "yolo"}, num_classes=4)
    with pytest.raises(ValueError, match="unknown model.type None"):
        build_detector({k: v for k, v in smoke_model_cfg().items() if k != "type"}, num_classes=4)
    assert set(DETECTOR_TYPES) >= {"faster_rcnn", "cascade_rcnn", "cascade_mask_rcnn"}


@pytest.mark.parametrize(("kind", "mask"), [("cascade_rcnn", False), ("cascade_mask_rcnn", True)])
def test_cascade_types_get_a_backbone_and_mask_flag(monkeypatch, kind, mask):
    import cellmask.models.registry as models

    seen = {}

    def fake_builder(model_cfg, num_classes, backbone):
        seen.update(cfg=model_cfg, num_classes=num_classes, backbone=backbone)
        return "built"

    monkeypatch.setitem(models._REGISTRY, kind, fake_builder)
    cfg = smoke_model_cfg()
    cfg["type"] = kind
    assert build_detector(cfg, num_classes=9) == "built"
    assert seen["cfg"]["mask"]["enabled"] is mask and seen["num_classes"] == 9
    assert seen["backbone"].out_channels == 32
    assert cfg["mask"]["enabled"] is None  # set from the type in a copy, the caller's is untouched
    cfg["mask"] = {"enabled": not mask}
    with pytest.raises(ValueError, match="contradicts"):
        build_detector(cfg, num_classes=9)


def test_register_detector_adds_a_type(monkeypatch):
    import cellmask.models.registry as models

    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    register_detector("my_rcnn", "cellmask.models.faster_rcnn:build_faster_rcnn")
    model = build_detector({**smoke_model_cfg(), "type": "my_rcnn"}, num_classes=3)
    assert isinstance(model, CellFasterRCNN)


def test_importing_models_is_cheap():
    code = (
        "import sys, cellmask.models; print(any(m in sys.modules for m in ('torch', 'timm', 'torchvision')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_resnest_faster_rcnn_trains_at_batch_one():
    torch.manual_seed(0)
    image, target = synthetic_image(np.random.default_rng(1), 96, 120, 3)
    model = build_detector(resnest_cfg(), num_classes=4).train()
    losses = model([image], [target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad is not None


@pytest.mark.numerics
def test_training_loss_falls(trained):
    _, _, _, losses = trained
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert np.isfinite(losses).all()
    assert last < 0.5 * first, (first, last)


@pytest.mark.numerics
def test_overfit_top_detections_hit_the_truth(trained):
    model, images, targets, _ = trained
    with torch.no_grad():
        outputs = model(images)
    for out, target in zip(outputs, targets, strict=True):
        n = len(target["boxes"])
        top = out["boxes"][: 2 * n]  # sorted by score
        assert len(top) >= n
        best = box_iou(target["boxes"], top).max(dim=1).values
        assert (best > 0.5).float().mean() >= 0.8, best
        assert out["scores"][:n].min() > 0.5


@pytest.mark.numerics
def test_eval_boxes_are_in_original_image_coordinates(trained):
    model, images, targets, _ = trained
    # the same image at another size: detections scale with it (the transform resizes inside)
    big = torch.nn.functional.interpolate(images[0][None], scale_factor=2.0, mode="bilinear")[0]
    with torch.no_grad():
        small_out, big_out = model([images[0], big])
    for out, image in [(small_out, images[0]), (big_out, big)]:
        h, w = image.shape[-2:]
        assert set(out) == {"boxes", "labels", "scores"}
        boxes = out["boxes"]
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all()
    n = len(targets[0]["boxes"])
    best = box_iou(targets[0]["boxes"] * 2, big_out["boxes"][: 2 * n]).max(dim=1).values
    assert (best > 0.5).float().mean() >= 0.8, best


@pytest.mark.parametrize("profile", ["smoke", "paper"])
def test_builds_from_the_branch_config(profile):
    path = CONFIGS / "faster_rcnn_swin_t.yaml"
    cfg = config.load_config(path, profile=profile, overrides={"model": {"backbone": {"pretrained": False}}})
    model = build_detector(cfg["model"], num_classes=4)
    assert isinstance(model, CellFasterRCNN)
    assert model.backbone.name == cfg["model"]["backbone"]["name"] == "swin_tiny_patch4_window7_224.ms_in1k"
    if profile == "paper":  # construction only: a paper-size forward is too slow for the tests
        assert model.roi_heads.detections_per_img == cfg["model"]["roi"]["detections_per_img"] >= 3000
        assert model.backbone.out_channels == 256 and model.transform.min_size == (540,)
        assert model.backbone.frozen_stages == -1 and all(
            p.requires_grad for p in model.backbone.parameters()
        )
        return
    image, target = synthetic_image(np.random.default_rng(2), 100, 130, 3)
    losses = model.train()([image], [target])
    assert torch.isfinite(sum(losses.values()))


def test_checkpoints_of_torchvisions_faster_rcnn_load_unchanged():
    # the earlier CellFasterRCNN was torchvision's FasterRCNN: same module names, same keys
    import copy

    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    cfg = smoke_model_cfg()
    torch.manual_seed(0)
    ours = build_detector(cfg, num_classes=4).eval()
    torch.manual_seed(1)
    r, roi = cfg["rpn"], cfg["roi"]
    theirs = FasterRCNN(
        copy.deepcopy(ours.backbone),
        num_classes=None,
        min_size=128,
        max_size=160,
        image_mean=cfg["transform"]["image_mean"],
        image_std=cfg["transform"]["image_std"],
        rpn_anchor_generator=AnchorGenerator(
            ((8.0,), (16.0,), (32.0,), (64.0,), (128.0,)), ((0.25, 0.5, 1.0, 2.0, 4.0),) * 5
        ),
        rpn_head=RPNHead(32, 5),
        rpn_pre_nms_top_n_test=r["pre_nms_top_n_test"],
        rpn_post_nms_top_n_test=r["post_nms_top_n_test"],
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2),
        box_head=TwoMLPHead(32 * 49, roi["representation_size"]),
        box_predictor=FastRCNNPredictor(roi["representation_size"], 4),
        box_score_thresh=roi["score_thresh"],
        box_detections_per_img=roi["detections_per_img"],
    ).eval()
    for p in theirs.parameters():  # visible weights: the loaded model must reproduce them
        p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    state = theirs.state_dict()
    assert set(state) == set(ours.state_dict())
    ours.load_state_dict(state, strict=True)
    image, _ = synthetic_image(np.random.default_rng(3), 110, 140, 4)
    with torch.no_grad():
        a, b = ours([image])[0], theirs([image])[0]
    assert len(a["boxes"]) > 0
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(a[key], b[key]), key


@pytest.mark.numerics
def test_eval_boxes_under_autocast_are_float32_and_close_to_float32_ones(trained):
    from test_autocast import assert_eval_under_autocast_close

    model, images, _, _ = trained
    assert_eval_under_autocast_close(model, images, min_confident=4)


def test_fixed_scale_transform_keeps_native_pixels_whatever_the_size():
    """model.transform.scale (the cpu profile's 1.0): a 256x256 training window and a whole
    520x704 image both enter at native pixels (min/max sizes would blow the window up 2x), and
    boxes come back to the original image exactly; another factor scales every size alike."""
    from cellmask.models.backbones import nominal_input_size
    from cellmask.models.transform import build_transform

    model_cfg = config.load_config(CONFIGS / "faster_rcnn_swin_t.yaml", "cpu")["model"]
    assert model_cfg["transform"]["scale"] == 1.0
    t = build_transform(model_cfg).train()
    boxes = torch.tensor([[10.0, 20.0, 40.0, 50.0]])
    for h, w in ((256, 256), (520, 704)):
        batch, targets = t(
            [torch.rand(3, h, w)], [{"boxes": boxes.clone(), "labels": torch.ones(1, dtype=torch.int64)}]
        )
        assert batch.image_sizes == [(h, w)] and torch.equal(targets[0]["boxes"], boxes)
    assert nominal_input_size(540, 720, 32, scale=1.0) == (544, 704)
    half = build_transform({**model_cfg, "transform": {**model_cfg["transform"], "scale": 0.5}}).eval()
    batch, _ = half([torch.rand(3, 520, 704)])
    assert batch.image_sizes == [(260, 352)]
    out = half.postprocess([{"boxes": boxes.clone()}], batch.image_sizes, [(520, 704)])
    assert torch.allclose(out[0]["boxes"], boxes * 2)
    legacy = {k: v for k, v in model_cfg["transform"].items() if k != "scale"}  # runs saved before it
    assert build_transform({**model_cfg, "transform": legacy}).scale is None
    with pytest.raises(ValueError, match="scale"):
        build_transform({**model_cfg, "transform": {**model_cfg["transform"], "scale": 0}})
