"""Config loading: _base_ inheritance, profiles, overrides, errors, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cellmask.config import deep_merge, get, load_config, parse_overrides, save_config
from cellmask.models.sections import SECTION_KEYS, section

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL_FILES = {
    "faster_rcnn_swin_t.yaml": ("faster_rcnn", "swin_tiny_patch4_window7_224.ms_in1k", False),
    "cascade_rcnn_resnext101.yaml": ("cascade_rcnn", "resnext101_32x4d.gluon_in1k", False),
    "cascade_rcnn_resnest101.yaml": ("cascade_rcnn", "resnest101e.in1k", False),
    "cascade_mask_rcnn_resnext101.yaml": ("cascade_mask_rcnn", "resnext101_32x4d.gluon_in1k", True),
}


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """base.yaml <- mid.yaml <- leaf.yaml, each with profile sections."""
    write(
        tmp_path / "base.yaml",
        {
            "train": {"epochs": 36, "lr": 1e-4, "milestones": [8, 11]},
            "model": {"type": "faster_rcnn", "backbone": {"name": "a", "kwargs": {"x": 1, "y": 2}}},
            "profiles": {"demo": {"train": {"epochs": 12}}, "smoke": {"train": {"epochs": 2}}},
        },
    )
    write(
        tmp_path / "mid.yaml",
        {
            "_base_": "base.yaml",
            "model": {"type": "cascade_rcnn", "backbone": {"name": "b"}},
            "profiles": {"smoke": {"model": {"backbone": {"kwargs": {"y": 3}}}}},
        },
    )
    sub = tmp_path / "sub"
    sub.mkdir()
    write(
        sub / "leaf.yaml",
        {
            "_base_": "../mid.yaml",
            "train": {"milestones": [5]},
            "profiles": {"smoke": {"train": {"lr": 5e-4}}, "tiny": {"train": {"epochs": 1}}},
        },
    )
    return sub / "leaf.yaml"


def test_deep_merge_is_recursive_and_pure():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    over = {"a": {"c": [3], "e": None}, "f": {"g": 1}}
    merged = deep_merge(base, over)
    assert merged == {"a": {"b": 1, "c": [3], "e": None}, "d": 1, "f": {"g": 1}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # untouched
    merged["a"]["c"].append(9)
    assert over["a"]["c"] == [3]  # no shared lists


def test_inheritance_paper_profile(chain: Path):
    cfg = load_config(chain)
    assert cfg["profile"] == "paper"
    assert "profiles" not in cfg and "_base_" not in cfg
    assert cfg["train"] == {"epochs": 36, "lr": 1e-4, "milestones": [5]}  # list replaced, not merged
    assert cfg["model"] == {"type": "cascade_rcnn", "backbone": {"name": "b", "kwargs": {"x": 1, "y": 2}}}


def test_profile_sections_apply_at_every_level(chain: Path):
    smoke = load_config(chain, "smoke")
    assert smoke["profile"] == "smoke"
    assert smoke["train"]["epochs"] == 2  # from base's smoke section
    assert smoke["train"]["lr"] == 5e-4  # from leaf's smoke section
    assert smoke["model"]["backbone"] == {"name": "b", "kwargs": {"x": 1, "y": 3}}  # mid's smoke
    demo = load_config(chain, "demo")
    assert demo["train"]["epochs"] == 12 and demo["model"]["backbone"]["kwargs"]["y"] == 2
    assert load_config(chain, "tiny")["train"]["epochs"] == 1  # a profile only the leaf defines


def test_a_base_profile_section_does_not_override_the_child(tmp_path: Path):
    write(tmp_path / "base.yaml", {"x": 1, "profiles": {"demo": {"x": 2}}})
    write(tmp_path / "child.yaml", {"_base_": "base.yaml", "x": 3})
    assert load_config(tmp_path / "child.yaml", "demo")["x"] == 3  # the child states what differs


def test_overrides_mapping_and_strings(chain: Path):
    cfg = load_config(chain, "smoke", overrides={"train": {"epochs": 7}, "new": {"k": "v"}})
    assert cfg["train"]["epochs"] == 7 and cfg["train"]["lr"] == 5e-4 and cfg["new"] == {"k": "v"}
    cfg = load_config(chain, overrides=["train.epochs=3", "model.backbone.kwargs.x=null", "train.tag=abc"])
    assert cfg["train"]["epochs"] == 3 and cfg["model"]["backbone"]["kwargs"] == {"x": None, "y": 2}
    assert cfg["train"]["tag"] == "abc"
    assert parse_overrides(["a.b=[1, 2]", "a.c=1.0e-4"]) == {"a": {"b": [1, 2], "c": 1e-4}}
    with pytest.raises(ValueError, match="KEY.PATH=VALUE"):
        parse_overrides(["noequals"])


def test_unknown_profile_names_file_and_known_profiles(chain: Path):
    with pytest.raises(ValueError) as err:
        load_config(chain, "huge")
    message = str(err.value)
    assert str(chain) in message and "'huge'" in message
    for name in ("demo", "paper", "smoke", "tiny"):
        assert name in message


def test_missing_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "child.yaml", {"_base_": "missing_base.yaml", "x": 1})
    with pytest.raises(FileNotFoundError, match="missing_base.yaml") as err:
        load_config(tmp_path / "child.yaml")
    assert "child.yaml" in str(err.value)


def test_base_cycle_and_bad_yaml(tmp_path: Path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_save_config_round_trip(chain: Path, tmp_path: Path):
    cfg = load_config(chain, "smoke")
    cfg["tuple"] = (1, 2)
    cfg["path"] = tmp_path
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    back = yaml.safe_load(out.read_text())
    assert back["tuple"] == [1, 2] and back["path"] == str(tmp_path)
    assert back["train"] == cfg["train"] and back["profile"] == "smoke"
    assert get(back, "model.backbone.kwargs.y") == 3 and get(back, "model.nope.x", "dflt") == "dflt"


@pytest.mark.parametrize("name", sorted(MODEL_FILES))
@pytest.mark.parametrize("profile", ["paper", "demo", "smoke"])
def test_shipped_model_configs(name: str, profile: str):
    model_type, backbone, mask = MODEL_FILES[name]
    cfg = load_config(CONFIGS / name, profile)
    model, train = cfg["model"], cfg["train"]
    assert model["type"] == model_type and model["backbone"]["name"] == backbone
    assert bool(model["mask"]["enabled"]) is mask
    assert model["roi"]["detections_per_img"] >= (3000 if profile == "paper" else 100)
    for name in SECTION_KEYS:  # every section complete: the builders read nothing from the code
        section(model, name)
    assert model["anchor"]["sizes"][0] == [8] and model["anchor"]["aspect_ratios"] == [
        0.25,
        0.5,
        1.0,
        2.0,
        4.0,
    ]
    assert len(model["cascade"]["iou_thresholds"]) == 3
    if profile == "paper":
        assert train["optimizer"] == "adamw" and train["lr"] == 1e-4 and train["weight_decay"] == 1e-2
        assert train["batch_size"] == 2 and train["scheduler"] == "cosine" and train["amp"] is True
        assert model["backbone"]["pretrained"] is True and model["fpn"]["out_channels"] == 256
        assert model["transform"]["min_size"] >= 520
    else:
        assert model["backbone"]["pretrained"] is False and train["amp"] is False
        assert model["transform"]["min_size"] <= 256 and train["epochs"] <= 12
    kwargs = model["backbone"]["kwargs"]
    if profile != "paper" and "embed_dim" in kwargs:  # swin: every stage's width divides by its heads
        dims = [kwargs["embed_dim"] * 2**i for i in range(4)]
        assert len(kwargs["depths"]) == len(kwargs["num_heads"]) == 4
        assert all(d % h == 0 for d, h in zip(dims, kwargs["num_heads"], strict=True))
    if profile == "smoke":
        assert model["transform"]["max_size"] <= 176 and model["fpn"]["out_channels"] <= 64
        assert model["roi"]["representation_size"] <= 128
        if "layers" in kwargs:
            # from scratch, frozen BN would normalise nothing: the small resnets use GroupNorm(1)
            assert kwargs == {
                "layers": [1, 1, 1, 1],
                "channels": [16, 32, 64, 128],
                "stem_width": 16,
                "norm_layer": "groupnorm1",
            }
        else:
            assert kwargs["depths"] == [1, 1, 1, 1] and kwargs["embed_dim"] == 32


def test_sgd_step_option_in_base():
    cfg = load_config(CONFIGS / "base.yaml", overrides=["train.optimizer=sgd", "train.scheduler=step"])
    train = cfg["train"]
    assert train["momentum"] == 0.9 and train["milestones"] == [8, 11] and train["gamma"] == 0.1
    assert set(cfg["augment"]) >= {
        "hflip",
        "shift_scale_rotate",
        "brightness_contrast",
        "gaussian_blur",
        "median_blur",
    }


def test_base_states_exactly_the_keys_the_model_builders_read():
    raw = yaml.safe_load((CONFIGS / "base.yaml").read_text())["model"]
    for name, keys in SECTION_KEYS.items():
        assert set(raw[name]) == set(keys), name
    assert set(raw) == {"type", *SECTION_KEYS}


def test_overrides_read_exponent_numbers_as_floats():
    """YAML 1.1 (PyYAML) reads ``1e-4`` without a dot as a string; ``--set train.lr=1e-4`` means a
    number (``train.max_hours=1e-9`` was refused as "not a number" before)."""
    from cellmask.config import parse_overrides

    out = parse_overrides(
        ["train.lr=1e-4", "train.max_hours=2E1", "train.x=1.5e-3", "train.name=e3", "a.b=1e"]
    )
    assert out["train"] == {"lr": 1e-4, "max_hours": 20.0, "x": 1.5e-3, "name": "e3"}
    assert out["a"]["b"] == "1e"
