"""The image-type classifier (:mod:`cellmask.models.image_type`) and where the pipeline uses it:
it learns the cell type of real images from windows, it decides each image's type (so its
thresholds) when ``predict.type_classifier`` names it, the oracle row and the per-type
diagnosis of :mod:`cellmask.evaluate.diagnose`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _predict_helpers import CONFIGS, PERMISSIVE, SEGMENTER_CONFIG, branch_config, run_config, save_run

from cellmask.models.image_type import ImageTypeClassifier, _type_label, build_image_classifier, image_types

pytestmark = pytest.mark.usefixtures("one_thread")
TYPES = {"shsy5y": 1, "cort": 2, "astro": 3}


def _images(records):
    from cellmask.data.images import read_image

    return [
        torch.from_numpy(read_image(r.path, (r.height, r.width))).float().div(255)[None].expand(3, -1, -1)
        for r in records
    ]


@pytest.mark.numerics
def test_it_learns_the_type_of_real_images_from_windows(real_records):
    """Trained on 128x128 windows of the 6 real images (2 per type), it types the whole images:
    far above chance (2 of 6), and the loss falls."""
    torch.manual_seed(0)
    images, labels = _images(real_records), [TYPES[r.cell_type] for r in real_records]
    model = ImageTypeClassifier(4, [8, 16, 32])
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    losses = []
    for _ in range(80):
        crops, targets = [], []
        for image, label in zip(images, labels, strict=True):
            y0, x0 = int(torch.randint(0, 520 - 128, ())), int(torch.randint(0, 704 - 128, ()))
            crops.append(image[:, y0 : y0 + 128, x0 : x0 + 128])
            targets.append({"labels": torch.tensor([label, label])})
        model.train()
        loss = model(crops, targets)["loss_type"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    assert np.mean(losses[-10:]) < 0.3 * losses[0]
    right = sum(int(p == y) for p, y in zip(image_types(model, images), labels, strict=True))
    assert right >= 4, right


def test_targets_outputs_and_config():
    assert (
        _type_label({"labels": torch.tensor([2, 2, 3])}) == 2
        and _type_label({"labels": torch.tensor([])}) == 0
    )
    model = build_image_classifier({"type": "image_type", "widths": [4, 8]}, num_classes=4)
    out = model.eval()([torch.rand(3, 64, 80), torch.rand(3, 70, 90)])  # sizes may differ
    assert [o["logits"].shape for o in out] == [torch.Size([3])] * 2 and all(
        1 <= o["label"] <= 3 for o in out
    )
    model.train()
    empty = model([torch.rand(3, 32, 32)], [{"labels": torch.tensor([])}])["loss_type"]
    assert float(empty.detach()) == 0.0 and empty.requires_grad  # a window without cells counts for nothing
    with pytest.raises(ValueError, match="model.widths"):
        build_image_classifier({"type": "image_type"}, 4)
    with pytest.raises(ValueError, match="must be 'image_type'"):
        build_image_classifier({"type": "faster_rcnn", "widths": [4]}, 4)


def _forced_classifier(out: Path, label: int) -> Path:
    """A classifier run whose answer is ``label`` for every image (zero weights, a biased head)."""
    cfg = run_config("image_type.yaml")
    model = build_image_classifier(cfg["model"], 4)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
        model.head.bias[label - 1] = 5.0
    cfg["model"]["backbone"] = {"pretrained": False}  # save_run's convention
    return save_run(out, cfg, model)


def _predictor(tmp_path: Path, overrides=()):
    from cellmask.predict import Predictor

    branch = save_run(tmp_path / "det", branch_config("faster_rcnn_swin_t.yaml", detections=20))
    seg = save_run(tmp_path / "seg", run_config(SEGMENTER_CONFIG))
    return Predictor.from_runs([branch], seg, overrides=[*PERMISSIVE, *overrides], device="cpu")


def test_the_classifier_decides_each_images_type(tmp_path, real_records):
    forced = _forced_classifier(tmp_path / "type", 3)  # astro, for every image
    predictor = _predictor(tmp_path, [f"predict.type_classifier={forced}"])
    image = _images(real_records[:1])[0]
    assert predictor.image_type(image) == 3
    dets = predictor.fuse(predictor.detect_raw([image])[0], tuple(image.shape[-2:]))
    inst = predictor.finish(image, dets)
    assert len(inst) and set(inst.labels.tolist()) == {3}  # every cell held to astro's threshold
    # the vote decides without a classifier; the paper-exact pipeline keeps every box's class
    assert predictor.image_type(image, {**predictor.options, "type_classifier": None}) is None
    assert predictor.image_type(image, {**predictor.options, "class_vote": False}) is None


def test_the_oracle_row_holds_each_image_to_its_true_types_threshold(tmp_path, real_records):
    from cellmask.evaluate.rows import Row, run_rows

    predictor = _predictor(tmp_path)
    # only shsy5y's threshold lets a box through: the oracle keeps cells on shsy5y images only
    thresholds = {"score_thresholds": {"shsy5y": 0.0, "cort": 1.1, "astro": 1.1}}
    rows = [Row("oracle", options=thresholds, true_type=True)]
    result = run_rows(predictor, real_records, rows, progress=False)[0]
    kept = {r.cell_type: bool(result.predictions[r.image_id]) for r in real_records}
    assert kept == {"shsy5y": True, "cort": False, "astro": False}


def test_diagnosis_counts_found_boxes_by_size_and_the_type_decisions(tmp_path, real_records):
    from cellmask.evaluate.diagnose import diagnose, size_bin

    assert [size_bin(a) for a in (10, 150, 999, 5000)] == ["<150", "150-400", "400-1000", ">=1000"]
    forced = _forced_classifier(tmp_path / "type", 2)  # cort
    predictor = _predictor(tmp_path, [f"predict.type_classifier={forced}"])
    d = diagnose(predictor, real_records, progress=False)
    assert d.decided_by == "image-type classifier" and set(d.confusion) == {
        "class vote",
        "image-type classifier",
    }
    assert d.confusion["image-type classifier"] == {
        "shsy5y": {"cort": 2},
        "cort": {"cort": 2},
        "astro": {"cort": 2},
    }
    acc = d.type_accuracy()
    assert acc["cort"] == 1.0 and acc["shsy5y"] == 0.0 and acc["all"] == pytest.approx(1 / 3)
    truths = {t: sum(v[1] for v in per.values()) for t, per in d.recall.items()}
    assert truths == {t: sum(len(r) for r in real_records if r.cell_type == t) for t in TYPES}
    assert all(0 <= v[0] <= v[1] for per in d.recall.values() for v in per.values())
    assert set(d.to_json()) >= {"recall", "recall_per_type", "confusion", "type_accuracy", "decided_by"}


def test_image_type_config_trains_through_the_engine(tmp_path, real_root):
    """`cellmask train --config configs/image_type.yaml` (smoke) on the real fixture images:
    validated by the fraction of whole images typed right, loaded back as a classifier run."""
    from cellmask.config import load_config
    from cellmask.predict.runs import load_type_classifier
    from cellmask.training.command import run_training

    cfg = load_config(CONFIGS / "image_type.yaml", "smoke", ["train.progress=false"])
    result = run_training(cfg, real_root, "sartorius", tmp_path / "run", device="cpu")
    assert result["best"]["metric"] == "val_accuracy" and 0.0 <= result["best"]["value"] <= 1.0
    model, config = load_type_classifier(tmp_path / "run")
    assert (
        isinstance(model, ImageTypeClassifier)
        and not model.training
        and config["model"]["type"] == "image_type"
    )


def test_threshold_tuning_follows_the_classifiers_type(tmp_path, real_records):
    """`cellmask tune` searches each type's threshold on the images that type is decided for: with
    a classifier named, its type, not the detections' vote (which may never say astro)."""
    from cellmask.evaluate.tune import _collect

    forced = _forced_classifier(tmp_path / "type", 3)
    predictor = _predictor(tmp_path, [f"predict.type_classifier={forced}"])
    images = _collect(predictor, real_records[:2], 0.0, False)
    assert all(set(img.labels.tolist()) <= {3} and img.relevant in ((), ("astro",)) for img in images)
    assert any(img.relevant == ("astro",) for img in images)
