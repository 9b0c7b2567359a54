"""Validation and ``cellmask train``: COCO box AP, validation sharded over ranks (identical to
one process), float32 detections, the parts builder chosen by ``model.type``, and the command
end to end."""

from __future__ import annotations

import csv
import math
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_toys import Oracle, ToyDataset

import cellmask.engine
from cellmask.engine import DistInfo, build_eval_loader, load_checkpoint
from cellmask.training.validation import coco_box_ap, detect

pytestmark = pytest.mark.usefixtures("one_thread")


class ThreadGather:
    """``gather_objects`` for ranks simulated by threads of one process (all_gather_object's
    semantics: every rank gets every rank's object in rank order)."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list = [None] * world

    def __call__(self, obj, info):
        self.slots[info.rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


def run_ranks(world: int, fn) -> list:
    """``fn(info)`` on ``world`` threads, one per simulated rank; their results in rank order."""
    results: list = [None] * world
    errors: list = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(DistInfo(rank=rank, world_size=world))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# ---------------------------------------------------------------------------------------- COCO AP


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}


def _pred(boxes, labels, scores=None):
    scores = scores if scores is not None else [0.9] * len(boxes)
    return {**_target(boxes, labels), "scores": torch.tensor(scores, dtype=torch.float32)}


TRUTH = [
    _target([[10, 10, 30, 30], [40, 40, 60, 70], [5, 50, 25, 60]], [1, 2, 1]),
    _target([[0, 0, 20, 20], [30, 5, 50, 25]], [3, 1]),
]


def test_coco_ap_hand_cases():
    perfect = [_pred(t["boxes"].tolist(), t["labels"].tolist()) for t in TRUTH]
    result = coco_box_ap(perfect, TRUTH, num_classes=4)
    assert result == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0), "AP75": pytest.approx(1.0)}

    empty = [_pred([], []) for _ in TRUTH]
    assert coco_box_ap(empty, TRUTH, num_classes=4) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}

    missing = [_pred(TRUTH[0]["boxes"][:2].tolist(), [1, 2]), perfect[1]]  # one class-1 box dropped
    result = coco_box_ap(missing, TRUTH, num_classes=4)
    assert 0.0 < result["AP50"] < 1.0 and result["AP"] < 1.0

    wrong_class = [_pred(t["boxes"].tolist(), [1] * len(t["boxes"])) for t in TRUTH]
    assert coco_box_ap(wrong_class, TRUTH, num_classes=4)["AP50"] < 1.0

    shifted = [
        _pred((t["boxes"] + torch.tensor([3.0, 0, 3, 0])).tolist(), t["labels"].tolist()) for t in TRUTH
    ]  # IoU 0.74
    result = coco_box_ap(shifted, TRUTH, num_classes=4)
    assert result["AP75"] == 0.0 and result["AP50"] > 0.0

    assert math.isnan(coco_box_ap(empty, [_target([], []) for _ in TRUTH])["AP"])  # no truth at all


def test_coco_ap_counts_more_than_100_detections_per_image():
    xs = np.arange(0, 15 * 15, 15)
    boxes = [[x, y, x + 10, y + 10] for x in xs for y in xs[:10]]  # 150 cells in one image
    truth = [_target(boxes, [1] * len(boxes))]
    assert coco_box_ap([_pred(boxes, [1] * len(boxes))], truth, num_classes=2)["AP50"] == pytest.approx(1.0)
    capped = coco_box_ap([_pred(boxes, [1] * len(boxes))], truth, num_classes=2, max_dets=(1, 10, 100))
    assert capped["AP50"] < 0.7  # COCO's default 100 would cap recall at 100/150


def test_detections_leave_the_model_as_float32():
    data = ToyDataset(n=3).items  # the un-augmented items: the same images every time
    oracle = Oracle(data)
    predictions, truths = detect(oracle, build_eval_loader(data, {"train": {"num_workers": 0}}))
    assert len(predictions) == len(truths) == 3
    assert all(p["boxes"].dtype == p["scores"].dtype == torch.float32 for p in predictions)


def test_sharded_validation_equals_one_process(real_records, monkeypatch):
    """`cellmask train`'s detector val_fn on two ranks (threads exchanging their detections):
    every rank returns the AP of one process over the whole validation set."""
    from cellmask.data.datasets import DetectionDataset
    from cellmask.data.transforms import build_transforms
    from cellmask.training.parts import detector_parts

    val_records = real_records[1:4]  # the three sparsest images (COCOeval is slow): shards of 2 and 1
    oracle = Oracle(DetectionDataset(val_records, build_transforms({}, train=False)))
    monkeypatch.setattr("cellmask.models.build_detector", lambda model_cfg, num_classes: oracle)
    cfg = {"model": {"type": "faster_rcnn"}, "train": {"num_workers": 0, "batch_size": 2, "amp": False}}

    _, train_loader, val_fn = detector_parts(cfg, real_records[4:], val_records, 4, DistInfo())
    expected = val_fn(oracle, 0, DistInfo())
    assert 0.2 < expected["AP"] < 0.9 and train_loader.dataset.dataset.source.image_cache

    monkeypatch.setattr(cellmask.engine, "gather_objects", ThreadGather(2))
    parts = [
        detector_parts(cfg, real_records[4:], val_records, 4, DistInfo(rank=r, world_size=2)) for r in (0, 1)
    ]
    results = run_ranks(2, lambda info: parts[info.rank][2](oracle, 0, info))
    assert results == [expected, expected]

    alone = parts[0][2](oracle, 0, DistInfo())  # rank 0's shard scored alone: not the set's AP
    assert alone["AP"] != expected["AP"]

    cfg["train"]["image_cache"] = False
    assert not detector_parts(cfg, real_records[4:], [], 4, DistInfo())[1].dataset.dataset.source.image_cache


# -------------------------------------------------------------------------------- parts dispatch


def test_parts_builder_follows_model_type(monkeypatch):
    from cellmask.training import parts as train

    assert train.parts_builder({"model": {"type": "segmenter"}}) is train.segmenter_parts
    assert train.parts_builder({"model": {"type": "cascade_rcnn"}}) is train.detector_parts
    fake = types.ModuleType("cellmask.training.soft_teacher")
    fake.soft_teacher_parts = lambda *args: "soft teacher parts"
    monkeypatch.setitem(sys.modules, "cellmask.training.soft_teacher", fake)
    assert train.parts_builder({"model": {"type": "soft_teacher"}}) is fake.soft_teacher_parts

    monkeypatch.setattr(train, "SOFT_TEACHER_PARTS", "cellmask.no_such_module:soft_teacher_parts")
    with pytest.raises(ImportError, match=r"soft_teacher.*cellmask\.no_such_module:soft_teacher_parts"):
        train.parts_builder({"model": {"type": "soft_teacher"}})


@pytest.mark.slow
def test_train_command_livecell_then_init_on_competition(tmp_path: Path):
    """`cellmask train` end to end on synthetic data: LIVECell (9 classes) -> --init competition (4)."""
    import argparse

    import yaml

    from cellmask.data import synthetic
    from cellmask.training.command import add_train_arguments, cli_train

    root = tmp_path / "data"
    synthetic.write_dataset(root, n_train=6, n_unlabeled=0, n_test=0, n_livecell=6, seed=0, size=(130, 176))
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config = Path(__file__).resolve().parents[1] / "configs" / "faster_rcnn_swin_t.yaml"
    common = ["--config", str(config), "--data", str(root), "--profile", "smoke", "--device", "cpu"]
    common += ["--set", "train.progress=false"]

    args = parser.parse_args(
        [*common, "--dataset", "livecell", "--out", str(tmp_path / "lc"), "--epochs", "1"]
    )
    assert cli_train(args) == 0
    saved = yaml.safe_load((tmp_path / "lc" / "config.yaml").read_text())
    assert saved["profile"] == "smoke" and saved["data"]["num_classes"] == 9 and saved["train"]["epochs"] == 1

    out = tmp_path / "ft"
    args = parser.parse_args([*common, "--dataset", "sartorius", "--out", str(out), "--epochs", "1"])
    args.init = str(tmp_path / "lc" / "best.pt")
    assert cli_train(args) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["config"]["data"]["classes"] == ["shsy5y", "cort", "astro"]
    cls = [v for k, v in ckpt["model"].items() if k.endswith("cls_score.weight")]
    assert cls and cls[0].shape[0] == 4
    with (out / "metrics.csv").open() as f:
        assert "val_AP" in next(csv.DictReader(f))

    args = parser.parse_args([*common, "--dataset", "sartorius", "--out", str(tmp_path / "none"), "--resume"])
    with pytest.raises(FileNotFoundError, match="last.pt"):
        cli_train(args)
