"""Loading runs for inference: which checkpoint, which config, the WBF weight, and one clear
error for each way a run can be wrong (missing, corrupt, not fitting its config, wrong kind)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from _predict_helpers import SEGMENTER_CONFIG, block_network, branch_config, build, run_config, save_run

from cellmask.engine import CheckpointError
from cellmask.predict import Predictor, load_detector, load_run_model, load_segmenter, resolve_run

pytestmark = pytest.mark.usefixtures("one_thread")

FASTER = "faster_rcnn_swin_t.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "det": save_run(root / "det", branch_config(FASTER, weight=2)),
        "seg": save_run(root / "seg", run_config(SEGMENTER_CONFIG)),
    }


def test_checkpoint_choice_best_then_last_then_newest_epoch(tmp_path, runs):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes((runs["det"] / "config.yaml").read_bytes())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_run(run)
    ckpt = (runs["det"] / "best.pt").read_bytes()
    for name in ("epoch_002.pt", "epoch_010.pt", "epoch_009.pt"):
        (run / name).write_bytes(ckpt)
    spec = resolve_run(run)
    assert spec.checkpoint.name == "epoch_010.pt" and "newest epoch" in spec.reason
    (run / "last.pt").write_bytes(ckpt)
    spec = resolve_run(run)
    assert spec.checkpoint.name == "last.pt" and "no best.pt" in spec.reason
    (run / "best.pt").write_bytes(ckpt)
    spec = resolve_run(run)
    assert spec.checkpoint.name == "best.pt" and spec.config_file == run / "config.yaml"
    # a checkpoint path: the config beside it; without one, the config inside the checkpoint
    lone = tmp_path / "lone" / "model.pt"
    lone.parent.mkdir()
    lone.write_bytes(ckpt)
    spec = resolve_run(lone)
    assert spec.config_file is None and spec.kind == "faster_rcnn" and spec.reason == "the checkpoint given"


def test_weight_and_name_come_from_the_run_config(tmp_path, runs):
    spec = resolve_run(runs["det"])
    assert spec.weight == 2.0 and spec.name == "Faster R-CNN Swin-T" and spec.kind == "faster_rcnn"
    cfg = branch_config(FASTER)
    del cfg["ensemble"]  # a run whose config predates contract 6
    no_weight = save_run(tmp_path / "w", cfg)
    assert resolve_run(no_weight).weight == 1.0  # contract 6: default 1
    pred = Predictor.from_runs([runs["det"], no_weight], runs["seg"], device="cpu")
    assert [b.weight for b in pred.branches] == [2.0, 1.0]
    assert pred.branches[0].name != pred.branches[1].name  # same model type: names made unique
    assert not any(p.requires_grad and p.grad is not None for p in pred.segmenter.parameters())


def test_loaded_weights_equal_the_saved_ones_with_pretrained_forced_off(tmp_path, monkeypatch):
    model = build(branch_config(FASTER), seed=3)
    run = save_run(tmp_path / "r", branch_config(FASTER), model, pretrained=True)
    block_network(monkeypatch)  # the config asks for ImageNet weights: loading must not fetch them
    loaded, loaded_cfg = load_detector(run)
    assert not loaded.training and loaded_cfg["model"]["backbone"]["pretrained"] is True
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_and_corrupt_checkpoints(tmp_path, runs):
    missing = tmp_path / "runs" / "nothing"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_detector(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Predictor.from_runs([runs["det"]], missing)
    run = tmp_path / "corrupt"
    run.mkdir()
    (run / "config.yaml").write_bytes((runs["det"] / "config.yaml").read_bytes())
    (run / "best.pt").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"best\.pt: not a readable checkpoint"):
        load_detector(run)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.yaml").write_bytes((runs["det"] / "config.yaml").read_bytes())
    data = (runs["det"] / "best.pt").read_bytes()
    (truncated / "best.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(truncated / "best.pt")):
        load_detector(truncated)


def test_a_config_that_does_not_match_its_weights(tmp_path, runs):
    run = tmp_path / "edited"
    run.mkdir()
    (run / "best.pt").write_bytes((runs["det"] / "best.pt").read_bytes())
    cfg = yaml.safe_load((runs["det"] / "config.yaml").read_text())
    cfg["model"]["fpn"]["out_channels"] = 48  # trained with 32
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError) as err:
        load_detector(run)
    message = str(err.value)
    assert str(run / "best.pt") in message and str(run / "config.yaml") in message
    assert "shape mismatch" in message and "fpn" in message
    # an inference-time edit (no weight changes shape) is honoured
    cfg["model"]["fpn"]["out_channels"] = 32
    cfg["model"]["roi"]["score_thresh"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    model, _ = load_detector(run)
    assert model.roi_heads.score_thresh == 0.5


def test_runs_of_the_wrong_kind(tmp_path, runs):
    with pytest.raises(CheckpointError, match="is a segmenter checkpoint.*--segmenter"):
        Predictor.from_runs([runs["seg"]], runs["seg"])
    with pytest.raises(CheckpointError, match="expected a segmenter"):
        Predictor.from_runs([runs["det"]], runs["det"])
    with pytest.raises(CheckpointError, match="expected a segmenter"):
        load_segmenter(runs["det"])
    livecell = save_run(tmp_path / "lc", run_config(FASTER, dataset="livecell", num_classes=9))
    with pytest.raises(CheckpointError, match="livecell with 8 classes"):
        load_detector(livecell)


def test_cli_reports_a_wrong_run_in_one_line(tmp_path, runs, capsys, real_root):
    from cellmask.cli import main

    argv = ["predict", "--images", str(real_root / "test"), "--runs", str(runs["seg"])]
    status = main(
        [*argv, "--segmenter", str(runs["seg"]), "--out", str(tmp_path / "s.csv"), "--device", "cpu"]
    )
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "is a segmenter checkpoint" in err and str(runs["seg"]) in err
    assert not (tmp_path / "s.csv").exists()


class _Wrapper(torch.nn.Module):
    """A training-time wrapper whose inference model is one of its parts (contract 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.student = build(branch_config(FASTER), seed=1)
        self.teacher = build(branch_config(FASTER), seed=2)

    def inference_model(self) -> torch.nn.Module:
        return self.teacher


def test_inference_model_replaces_a_wrapper(tmp_path, monkeypatch):
    import cellmask.models.registry

    monkeypatch.setitem(
        cellmask.models.registry._REGISTRY, "fake_teacher", lambda cfg, n, backbone: _Wrapper()
    )
    cfg = branch_config(FASTER)
    cfg["model"]["type"] = "fake_teacher"
    wrapper = _Wrapper()
    with torch.no_grad():
        for p in wrapper.teacher.parameters():
            p.add_(0.5)  # weights no fresh build has
    model = load_run_model(resolve_run(save_run(tmp_path / "st", cfg, wrapper)), "detector")
    assert not isinstance(model, _Wrapper) and not model.training
    for key, value in wrapper.teacher.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_fingerprint_changes_with_the_checkpoint_and_the_model_config(tmp_path, runs):
    run = tmp_path / "fp"
    run.mkdir()
    for name in ("best.pt", "config.yaml"):
        (run / name).write_bytes((runs["det"] / name).read_bytes())
    first = resolve_run(run).fingerprint()
    assert resolve_run(run).fingerprint() == first  # stable
    stat = (run / "best.pt").stat()
    os.utime(run / "best.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # retrained in place
    second = resolve_run(run).fingerprint()
    assert second != first
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["roi"]["score_thresh"] = 0.3  # an inference-time edit changes the detections
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert resolve_run(run).fingerprint() not in (first, second)
