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


# [22] = Soft Teacher (Xu et al., ICCV 2021); the paper (5.3) trains branch 4 with its default
# augmentations. Each row: the resolved semi: key, its value, and where microsoft/SoftTeacher
# states it (B = configs/soft_teacher/base.py, R = ssod/datasets/pipelines/rand_aug.py).
_RESIZE = {"img_scale": [[1333, 400], [1333, 1200]], "test_scale": [1333, 800]}
_COLOUR = [
    "identity",
    "autocontrast",
    "equalize",
    "solarize",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "posterize",
]
SOFT_TEACHER_REFERENCE = [
    # labeled: B train_pipeline = Sequential[RandResize, RandFlip, OneOf(colour)]
    (
        "labeled.rand_resize",
        _RESIZE,
        "B train_pipeline RandResize img_scale=[(1333, 400), (1333, 1200)], range, keep_ratio; B test_pipeline img_scale=(1333, 800)",
    ),
    ("labeled.hflip", 0.5, "B train_pipeline RandFlip(flip_ratio=0.5), mmdet's default direction horizontal"),
    ("labeled.vflip", 0.0, "B: no vertical flip"),
    (
        "labeled.color.ops",
        _COLOUR,
        "B train_pipeline OneOf[Identity, AutoContrast, RandEqualize, RandSolarize, RandColor, RandContrast, RandBrightness, RandSharpness, RandPosterize]",
    ),
    (
        "labeled.color.magnitude",
        [1, 9],
        "R RandAug(magnitude=10, random_magnitude=True): np.random.randint(1, 10)",
    ),
    ("labeled.fill", 125, "R GeometricAugmentation img_fill_val=125"),
    # weak: B weak_pipeline = Sequential[RandResize, RandFlip]
    ("weak.rand_resize", _RESIZE, "B weak_pipeline RandResize (as train_pipeline)"),
    ("weak.hflip", 0.5, "B weak_pipeline RandFlip(flip_ratio=0.5)"),
    ("weak.vflip", 0.0, "B: no vertical flip"),
    ("weak.max_scale", 1.0, "ours: the teacher's view stays whole (B shows the resized image whole)"),
    ("weak.scale", None, "ours: rand_resize instead of the smaller set's scale jitter"),
    ("weak.shift", 0.0, "ours: idem"),
    ("weak.fill", 125, "R img_fill_val=125"),
    # strong: B strong_pipeline = Sequential[RandResize, RandFlip, ShuffledSequential[OneOf(colour),
    # OneOf(geometric)], RandErase]
    ("strong.rand_resize", _RESIZE, "B strong_pipeline RandResize (as train_pipeline)"),
    ("strong.hflip", 0.5, "B strong_pipeline RandFlip(flip_ratio=0.5)"),
    ("strong.vflip", 0.0, "B: no vertical flip"),
    ("strong.color.ops", _COLOUR, "B strong_pipeline ShuffledSequential[OneOf(colour: the same 9 ops), ...]"),
    ("strong.color.magnitude", [1, 9], "R RandAug defaults"),
    (
        "strong.geometric.ops",
        ["translate_x", "translate_y", "rotate", "shear"],
        "B OneOf[RandTranslate(x), RandTranslate(y), RandRotate, [RandShear(x), RandShear(y)]]",
    ),
    (
        "strong.geometric.translate",
        [-0.1, 0.1],
        "B RandTranslate x=(-0.1, 0.1) / y=(-0.1, 0.1), fractions of img_shape (R)",
    ),
    ("strong.geometric.rotate", [-30, 30], "B RandRotate angle=(-30, 30), about the image centre (R)"),
    ("strong.geometric.shear", [-30, 30], "B RandShear x=(-30, 30), y=(-30, 30) degrees, factor tanh (R)"),
    ("strong.erase.p", 1.0, "R GeometricAugmentation prob=1.0"),
    ("strong.erase.count", [1, 4], "B RandErase n_iterations=(1, 5): np.random.randint -> 1..4 (R)"),
    ("strong.erase.size", [0.0, 0.2], "B RandErase size=[0, 0.2]"),
    ("strong.erase.shape", "image", "B RandErase squared=True: one ratio for both sides of the image (R)"),
    ("strong.scale", None, "ours: rand_resize instead of the smaller set's scale jitter"),
    ("strong.shift", 0.0, "ours: idem (B's translation is RandTranslate, in geometric)"),
    ("strong.fill", 125, "R img_fill_val=125 (RandTranslate/Rotate/Shear borders, RandErase patches)"),
    ("strong.brightness_contrast", None, "not in B (the smaller set's op)"),
    ("strong.gaussian_blur", None, "not in B (the smaller set's op)"),
]


@pytest.mark.parametrize(
    "key, value, source", SOFT_TEACHER_REFERENCE, ids=[r[0] for r in SOFT_TEACHER_REFERENCE]
)
def test_soft_teacher_paper_profile_uses_the_references_augmentations(key, value, source):
    from cellmask.config import get
    from cellmask.data.semi import semi_data_config

    semi = semi_data_config(load_config(CONFIGS / "soft_teacher_resnext101.yaml")["semi"])
    assert get(semi, key, "<missing>") == value, source


def test_soft_teacher_reference_table_covers_every_augmentation_key():
    from cellmask.data.semi import DEFAULT_SEMI_DATA

    def leaves(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict) and k not in ("rand_resize",):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    views = {k: DEFAULT_SEMI_DATA[k] for k in ("labeled", "weak", "strong")}
    assert set(leaves(views)) == {key for key, _, _ in SOFT_TEACHER_REFERENCE}
