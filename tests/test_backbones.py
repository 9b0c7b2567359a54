"""Backbones + FPN: paper-size parameter counts, P2..P6 at odd sizes, frozen BN/stages, Swin sizes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from cellmask.config import load_config
from cellmask.models.backbones import (
    backbone_param_count,
    build_backbone,
    build_body,
    nominal_input_size,
)

SWIN = "swin_tiny_patch4_window7_224"
RESNEXT = "resnext101_32x4d"
RESNEST = "resnest101e"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BRANCH = {SWIN: "faster_rcnn_swin_t", RESNEXT: "cascade_rcnn_resnext101", RESNEST: "cascade_rcnn_resnest101"}

SMOKE_KWARGS = {
    SWIN: {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]},
    RESNEXT: {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16},
    RESNEST: {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16},
}
FPN = {"out_channels": 32}
LEVELS = ["0", "1", "2", "3", "pool"]
STRIDES = [4, 8, 16, 32, 64]


pytestmark = pytest.mark.usefixtures("one_thread")


def paper_cfg(name: str, **extra) -> dict:
    """The paper profile's ``model.backbone`` of ``name``'s branch, without downloading weights."""
    section = load_config(CONFIGS / f"{BRANCH[name]}.yaml")["model"]["backbone"]
    assert section["name"].split(".")[0] == name
    return {**section, "pretrained": False, **extra}


def smoke_cfg(name: str, **extra) -> dict:
    """``paper_cfg`` at reduced width/depth (BatchNorm kept: no ``norm_layer`` override)."""
    return paper_cfg(name, kwargs=dict(SMOKE_KWARGS[name]), **extra)


# Published sizes (with the ImageNet classifier): Swin-T 28.3M ("28M", Liu et al. 2021),
# ResNeXt-101 32x4d 44.2M, ResNeSt-101 48.3M (Zhang et al. 2020). The detection body drops the
# classifier (and Swin's final norm): timm 1.0 gives 27.52M, 42.13M and 46.23M.
@pytest.mark.parametrize(
    ("name", "expected", "published_with_head"),
    [(SWIN, 27.52e6, 28.29e6), (RESNEXT, 42.13e6, 44.18e6), (RESNEST, 46.23e6, 48.28e6)],
)
def test_paper_backbone_param_counts(name, expected, published_with_head):
    n = backbone_param_count(paper_cfg(name))
    assert n == pytest.approx(expected, rel=0.01)
    # body + a 2048/768 -> 1000 classifier is the published model
    head = {SWIN: 768 * 1000 + 1000 + 2 * 768}.get(name, 2048 * 1000 + 1000)
    assert n + head == pytest.approx(published_with_head, rel=0.01)
    if name == SWIN:
        assert n == pytest.approx(28e6, rel=0.05)


@pytest.mark.parametrize("name", [SWIN, RESNEXT, RESNEST])
@pytest.mark.parametrize("size", [(128, 160), (100, 150)])
def test_smoke_backbone_gives_p2_to_p6(name, size):
    backbone = build_backbone(smoke_cfg(name), FPN, image_size=(128, 160)).eval()
    assert backbone.out_channels == 32
    with torch.no_grad():
        feats = backbone(torch.rand(2, 3, *size))
    assert list(feats) == LEVELS
    h, w = size
    for key, stride in zip(LEVELS, STRIDES, strict=True):
        f = feats[key]
        assert f.shape[:2] == (2, 32)
        # every stride-2 step rounds up (conv padding / Swin's patch-merging pad): ceil(H / stride)
        assert tuple(f.shape[-2:]) == (math.ceil(h / stride), math.ceil(w / stride)), (key, f.shape)
        assert torch.isfinite(f).all()


def test_swin_runs_at_paper_input_size_without_a_forward_of_the_paper_model():
    # the smoke Swin at the paper's padded size and at the raw 520x704 (not a multiple of 32)
    backbone = build_backbone(smoke_cfg(SWIN), FPN, image_size=nominal_input_size(520, 704)).eval()
    with torch.no_grad():
        for size in [(544, 704), (520, 704)]:
            feats = backbone(torch.rand(1, 3, *size))
            assert tuple(feats["0"].shape[-2:]) == (math.ceil(size[0] / 4), math.ceil(size[1] / 4))
            assert tuple(feats["pool"].shape[-2:]) == (math.ceil(size[0] / 64), math.ceil(size[1] / 64))


def test_swin_parameters_do_not_depend_on_image_size():
    fpn = {"out_channels": 256}
    small = build_backbone(paper_cfg(SWIN), fpn, image_size=(128, 160)).state_dict()
    paper = build_backbone(paper_cfg(SWIN), fpn, image_size=(544, 736)).state_dict()
    assert small.keys() == paper.keys()
    assert all(small[k].shape == paper[k].shape for k in small)
    # windows stay 7x7 everywhere, so the ImageNet relative-position tables fit
    tables = [v for k, v in paper.items() if k.endswith("relative_position_bias_table")]
    assert tables and all(t.shape[0] == 13 * 13 for t in tables)


def test_swin_accepts_batches_of_another_size_than_img_size():
    backbone = build_backbone(smoke_cfg(SWIN), FPN, image_size=(128, 160)).eval()
    with torch.no_grad():
        for size in [(160, 128), (224, 288), (64, 96)]:
            feats = backbone(torch.rand(1, 3, *size))
            assert tuple(feats["3"].shape[-2:]) == (size[0] // 32, size[1] // 32)


@pytest.mark.parametrize(
    ("min_size", "max_size", "expected"),
    [(520, 704, (544, 704)), (800, 1333, (800, 1088)), (128, 160, (128, 160)), (256, 352, (256, 352))],
)
def test_nominal_input_size_is_what_the_detector_transform_makes(min_size, max_size, expected):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    assert nominal_input_size(min_size, max_size) == expected
    transform = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3).eval()
    batch, _ = transform([torch.zeros(3, 520, 704)])
    assert tuple(batch.tensors.shape[-2:]) == expected
    assert nominal_input_size([480, 520, 560], 704) == (544, 704)


@pytest.mark.parametrize("name", [RESNEXT, RESNEST])
def test_resnet_batchnorm_is_frozen_and_stem_plus_stage1_frozen_in_the_paper_profile(name):
    from torchvision.ops.misc import FrozenBatchNorm2d

    backbone = build_backbone(smoke_cfg(name), FPN)
    modules = list(backbone.body.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in modules)
    assert backbone.frozen_stages == 1
    for pname, p in backbone.body.named_parameters():
        frozen = pname.startswith(("conv1", "bn1", "layer1."))
        assert p.requires_grad != frozen, pname
    assert all(p.requires_grad for p in backbone.fpn.parameters())

    trainable = build_backbone(smoke_cfg(name, frozen_stages=-1), FPN)
    assert all(p.requires_grad for p in trainable.parameters())


def test_swin_frozen_stages():
    # the paper profile trains every Swin stage (Swin's own detection configs freeze nothing)
    assert smoke_cfg(SWIN)["frozen_stages"] == -1
    assert all(p.requires_grad for p in build_backbone(smoke_cfg(SWIN), FPN).parameters())
    backbone = build_backbone(smoke_cfg(SWIN, frozen_stages=1), FPN)
    for pname, p in backbone.body.named_parameters():
        assert p.requires_grad != pname.startswith(("patch_embed", "layers_0.")), pname
    backbone.train()
    assert not backbone.body.layers_0.training and backbone.body.layers_1.training
    with pytest.raises(ValueError, match="stages"):
        build_backbone(smoke_cfg(SWIN, frozen_stages=5), FPN)


def test_resnest_trains_at_batch_one_on_a_tiny_image():
    # split-attention BN on a 1x1 map at batch 1 fails with trainable BatchNorm
    backbone = build_backbone(smoke_cfg(RESNEST), FPN).train()
    feats = backbone(torch.rand(1, 3, 32, 32))
    assert tuple(feats["3"].shape[-2:]) == (1, 1)
    sum(f.sum() for f in feats.values()).backward()


def test_backbone_param_count_is_body_only():
    cfg = smoke_cfg(RESNEXT)
    body = build_body(cfg)
    assert backbone_param_count(cfg) == sum(p.numel() for p in body.parameters())
    full = build_backbone(cfg, FPN)
    assert sum(p.numel() for p in full.parameters()) > backbone_param_count(cfg)


@pytest.mark.parametrize("name", [SWIN, RESNEST])
def test_weights_file_loads_imagenet_style_checkpoint_offline(tmp_path, name):
    import timm

    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in SMOKE_KWARGS[name].items()}
    classifier = timm.create_model(name, pretrained=False, **kwargs)
    torch.save(classifier.state_dict(), tmp_path / "w.pth")
    backbone = build_backbone(smoke_cfg(name, weights_file=str(tmp_path / "w.pth")), FPN)
    reference = classifier.state_dict()
    body = backbone.body.state_dict()
    key = "layers_1.blocks.0.attn.qkv.weight" if name == SWIN else "layer2.0.conv1.weight"
    ref_key = key.replace("layers_1", "layers.1")
    assert torch.equal(body[key], reference[ref_key])


def test_unknown_backbone_is_an_error():
    with pytest.raises((RuntimeError, ValueError)):
        build_backbone({**paper_cfg(RESNEXT), "name": "no_such_backbone"}, FPN)
    with pytest.raises(ValueError, match=r"model\.backbone\.name"):
        build_backbone({}, FPN)
    with pytest.raises(ValueError, match=r"model\.backbone\.frozen_stages"):
        build_backbone({k: v for k, v in smoke_cfg(RESNEXT).items() if k != "frozen_stages"}, FPN)
    with pytest.raises(ValueError, match="unknown key"):
        build_backbone(smoke_cfg(RESNEXT, frozen_stage=1), FPN)
