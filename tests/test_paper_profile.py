"""The paper profile states the paper: its numbers, pinned in the resolved configs of every
detector branch so they cannot drift silently.

MDE-CellMask: images resized to 540x720 before detection (section 4); AdamW, lr 1e-4, weight
decay 1e-2, cosine schedule, 30-40 epochs, mini-batch 2, ImageNet weights for every backbone
(section 5.3); WBF weights 2 / 3 / 3 for Faster R-CNN Swin-T / Cascade R-CNN ResNeXt-101 /
Cascade R-CNN ResNeSt-101. Where the paper is silent the configs follow the authors' configs or
the reference implementation (frozen stages: mmdet's ResNet configs freeze the stem and stage 1,
Swin's freeze nothing).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cellmask.config import load_config
from cellmask.models.backbones import build_body, nominal_input_size
from cellmask.models.transform import build_transform

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# branch -> (WBF weight, timm name with its ImageNet-1k tag, frozen stages)
BRANCHES = {
    "faster_rcnn_swin_t": (2, "swin_tiny_patch4_window7_224.ms_in1k", -1),
    "cascade_rcnn_resnext101": (3, "resnext101_32x4d.gluon_in1k", 1),
    "cascade_rcnn_resnest101": (3, "resnest101e.in1k", 1),
}
SMOKE_KWARGS = {  # reduced bodies, only to read timm's pretrained config without a download
    "swin_tiny_patch4_window7_224": {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)},
    "resnext101_32x4d": {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), "stem_width": 16},
    "resnest101e": {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), "stem_width": 16},
}


def paper(branch: str) -> dict:
    return load_config(CONFIGS / f"{branch}.yaml", profile="paper")


@pytest.mark.parametrize("branch", [*BRANCHES, "cascade_mask_rcnn_resnext101"])
def test_training_recipe_is_the_papers(branch):
    train = paper(branch)["train"]
    assert train["optimizer"] == "adamw"
    assert train["lr"] == 1e-4 and train["weight_decay"] == 1e-2
    assert train["scheduler"] == "cosine"
    assert 30 <= train["epochs"] <= 40 and train["epochs"] == 36
    assert train["batch_size"] == 2
    assert train["val_fraction"] == 0.05  # the competition data split 95/5


@pytest.mark.parametrize("branch", [*BRANCHES, "cascade_mask_rcnn_resnext101"])
def test_input_is_resized_to_540x720_keeping_the_aspect_ratio(branch):
    model = paper(branch)["model"]
    assert (model["transform"]["min_size"], model["transform"]["max_size"]) == (540, 720)
    transform = build_transform(model).eval()
    batch, _ = transform([torch.zeros(3, 520, 704)])
    assert batch.image_sizes == [(531, 720)]  # 520x704 scaled by 720 / 704 (torchvision floors)
    assert tuple(batch.tensors.shape[-2:]) == (544, 736) == nominal_input_size(540, 720)


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_backbone_weights_wbf_weight_and_frozen_stages(branch):
    weight, name, frozen = BRANCHES[branch]
    cfg = paper(branch)
    backbone = cfg["model"]["backbone"]
    assert cfg["ensemble"]["weight"] == weight
    assert backbone["name"] == name and backbone["pretrained"] is True
    assert backbone["frozen_stages"] == frozen
    # the weights timm would load for this name are ImageNet-1k only, and normalised as we do
    arch, tag = name.split(".")
    body = build_body({**backbone, "pretrained": False, "kwargs": SMOKE_KWARGS[arch]})
    pretrained = body.pretrained_cfg
    assert pretrained["tag"] == tag and pretrained["hf_hub_id"] == f"timm/{name}"
    assert tag.endswith("in1k") and not any(s in tag for s in ("22k", "ssl", "yfcc", "ig1b", "wsl"))
    transform = cfg["model"]["transform"]
    assert tuple(transform["image_mean"]) == pytest.approx(pretrained["mean"])
    assert tuple(transform["image_std"]) == pytest.approx(pretrained["std"])


def test_resnext_tag_is_explicit_because_timms_default_is_not_imagenet_only():
    from timm.models import get_pretrained_cfg

    assert "yfcc100m" in get_pretrained_cfg("resnext101_32x4d").tag  # the trap the tag avoids
    assert get_pretrained_cfg("resnext101_64x4d.tv_in1k").tag == "tv_in1k"  # the authors' 64x4d


def test_baseline_is_branch_2_with_a_mask_head():
    base, mask = paper("cascade_rcnn_resnext101")["model"], paper("cascade_mask_rcnn_resnext101")["model"]
    assert mask["type"] == "cascade_mask_rcnn" and mask["mask"]["enabled"] is True
    assert {k: v for k, v in mask.items() if k not in ("type", "mask")} == {
        k: v for k, v in base.items() if k not in ("type", "mask")
    }


def test_the_800_pixel_fine_tuning_of_the_authors_code_is_documented_not_default():
    text = (CONFIGS / "base.yaml").read_text()
    sets = [s.strip('"') for s in re.findall(r'--set ("[^"]+"|\S+)', text)]
    assert len(sets) == 4, sets
    single, multi = sets[:2], sets[2:]
    cfg = load_config(CONFIGS / "faster_rcnn_swin_t.yaml", overrides=single)["model"]["transform"]
    assert nominal_input_size(cfg["min_size"], cfg["max_size"]) == (800, 1088)
    cfg = load_config(CONFIGS / "faster_rcnn_swin_t.yaml", overrides=multi)["model"]
    transform = build_transform(cfg)
    assert transform.min_size[-1] == 800 and set(transform.min_size) == {800, 832, 864, 896, 928, 960}
    assert transform.max_size == 1690
    assert paper("faster_rcnn_swin_t")["model"]["transform"]["min_size"] == 540  # not the default


def test_train_defaults_in_code_are_base_yamls():
    # train_config fills keys a config lacks from TRAIN_DEFAULTS: they must be base.yaml's values,
    # or a run built from a partial config would silently train with another recipe
    from cellmask.engine import TRAIN_DEFAULTS

    base = load_config(CONFIGS / "base.yaml")["train"]
    assert {k: base.get(k, "<missing from base.yaml>") for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS


def test_soft_teacher_defaults_in_code_are_its_configs():
    # the semi: numbers the code falls back on are the ones configs/soft_teacher_resnext101.yaml states
    from cellmask.data.semi import DEFAULT_SEMI_DATA
    from cellmask.models.soft_teacher.settings import DEFAULT_SEMI_MODEL

    semi = load_config(CONFIGS / "soft_teacher_resnext101.yaml")["semi"]
    assert {k: semi[k] for k in DEFAULT_SEMI_MODEL} == DEFAULT_SEMI_MODEL
    assert {k: semi[k] for k in DEFAULT_SEMI_DATA} == DEFAULT_SEMI_DATA
