"""Soft Teacher's model (cellmask.models.soft_teacher) with known numbers: the EMA step, the
pseudo-label score filter, the jitter uncertainty, the background weights and their effect on
the loss, the teacher -> student box mapping inside a training step, init mapping, checkpoints."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cellmask.config import load_config
from cellmask.data.semi import view_matrix
from cellmask.data.synthetic import synth_image
from cellmask.models import build_detector
from cellmask.models.faster_rcnn import CellFasterRCNN
from cellmask.models.soft_teacher import SoftTeacher, SoftTeacherSettings
from cellmask.models.soft_teacher import model as model_module
from cellmask.models.soft_teacher.ema import ema_momentum, ema_update
from cellmask.models.soft_teacher.losses import (
    background_weights,
    box_regression_loss,
    weighted_classification_loss,
)
from cellmask.models.soft_teacher.pseudo import (
    jitter_uncertainty,
    refine_boxes,
    resize_matrices,
    select_pseudo_labels,
    teacher_pass,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "soft_teacher_resnext101.yaml"
NUM_CLASSES = 4
IMAGE_HW = (100, 125)  # the smoke transform resizes it x1.28 to 128 x 160


@pytest.fixture(scope="module")
def smoke_cfg() -> dict:
    return load_config(CONFIG, profile="smoke")


@pytest.fixture(scope="module")
def smoke_model(smoke_cfg) -> SoftTeacher:
    torch.manual_seed(0)
    semi = {
        **smoke_cfg["semi"],
        "pseudo": {"score_thresh": 0.9, "reg_score_thresh": 0.5, "max_uncertainty": 0.02},
    }
    return build_detector({**smoke_cfg["model"], "semi": semi}, num_classes=NUM_CLASSES)


def _image(seed: int, cell_type: str = "shsy5y") -> tuple[torch.Tensor, torch.Tensor]:
    sample = synth_image(cell_type, *IMAGE_HW, rng=seed)
    image = torch.from_numpy(sample.image).float().div(255).expand(3, -1, -1).contiguous()
    boxes = torch.tensor(np.stack([inst.box() for inst in sample.instances]), dtype=torch.float32)
    return image, boxes


# ------------------------------------------------------------------------------------ EMA


def test_ema_update_hand_computed():
    teacher, student = nn.Linear(1, 1), nn.Linear(1, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0), teacher.bias.fill_(0.0)
        student.weight.fill_(3.0), student.bias.fill_(2.0)
    ema_update(teacher, student, 0.9)
    assert teacher.weight.item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)  # 1.2
    assert teacher.bias.item() == pytest.approx(0.9 * 0.0 + 0.1 * 2.0)  # 0.2
    assert student.weight.item() == 3.0 and student.bias.item() == 2.0


def test_ema_momentum_ramp():
    assert ema_momentum(0, 0.999) == pytest.approx(0.5)  # 1 - 1/2: the mean of two iterates
    assert ema_momentum(1, 0.999) == pytest.approx(2 / 3)
    assert ema_momentum(998, 0.999) == pytest.approx(0.999)  # 1 - 1/1000 reaches the cap
    assert ema_momentum(10_000, 0.999) == pytest.approx(0.999)
    assert ema_momentum(0, 0.999, warmup=100) == pytest.approx(1 - 101 / 102)


def test_on_optimizer_step_moves_the_teacher_by_the_ema():
    student = nn.Sequential(nn.Linear(2, 2))
    model = SoftTeacher(student, SoftTeacherSettings(ema_momentum=0.999))
    with torch.no_grad():
        student[0].weight.fill_(4.0)  # the teacher still holds the initial weights
    before = model.teacher[0].weight.detach().clone()
    model.on_optimizer_step(0)  # momentum 0.5
    assert torch.allclose(model.teacher[0].weight, 0.5 * before + 0.5 * 4.0)
    model.on_optimizer_step(5000)  # momentum 0.999
    expected = 0.999 * (0.5 * before + 2.0) + 0.001 * 4.0
    assert torch.allclose(model.teacher[0].weight, expected)
    assert not any(p.requires_grad for p in model.teacher.parameters())


# ---------------------------------------------------------------- model, hooks, checkpoints


def test_teacher_is_frozen_eval_and_the_inference_model(smoke_model, smoke_cfg):
    from cellmask.engine import build_optimizer

    model = copy.deepcopy(smoke_model)
    model.train()
    assert model.student.training and not model.teacher.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    teacher = model.inference_model()
    assert teacher is model.teacher and isinstance(teacher, CellFasterRCNN)
    optimised = {id(p) for g in build_optimizer(smoke_cfg, model).param_groups for p in g["params"]}
    assert optimised == {id(p) for p in model.student.parameters() if p.requires_grad}
    keys = model.state_dict().keys()
    assert any(k.startswith("teacher.") for k in keys) and any(k.startswith("student.") for k in keys)
    assert model.class_dependent_prefixes() == [
        "student.roi_heads.box_predictor.",
        "teacher.roi_heads.box_predictor.",
    ]


def test_a_plain_detector_batch_is_a_clear_error(smoke_model):
    image, boxes = _image(0)
    with pytest.raises(TypeError, match="collate_semi batch"):
        smoke_model.training_step(([image], [{"boxes": boxes, "labels": torch.ones(len(boxes))}]))


def test_checkpoint_round_trip_keeps_teacher_and_student(smoke_model, tmp_path: Path):
    model = copy.deepcopy(smoke_model)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.01)
    model.on_optimizer_step(3)  # teacher != student now
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pt")
    fresh = copy.deepcopy(smoke_model)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"])
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    image, _ = _image(0)
    fresh.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(fresh([image])[0]["boxes"], model.inference_model()([image])[0]["boxes"])


def test_plain_faster_rcnn_checkpoint_initialises_student_and_teacher(smoke_model, smoke_cfg):
    torch.manual_seed(1)
    plain = build_detector({**smoke_cfg["model"], "type": "faster_rcnn"}, num_classes=NUM_CLASSES)
    model = copy.deepcopy(smoke_model)
    mapped = model.map_init_state_dict(plain.state_dict())
    model.load_state_dict(mapped, strict=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[f"student.{key}"], value)
        assert torch.equal(model.state_dict()[f"teacher.{key}"], value)
    already = model.state_dict()
    assert model.map_init_state_dict(already).keys() == already.keys()  # a Soft Teacher run: as is


# ------------------------------------------------------------------------ pseudo-labels


def test_pseudo_label_score_filter():
    scores = torch.tensor([0.95, 0.9, 0.8999, 0.3, 1.0])
    assert select_pseudo_labels(scores, 0.9).tolist() == [True, True, False, False, True]
    assert select_pseudo_labels(scores, 0.5).tolist() == [True, True, True, False, True]


def _boxes(k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand((k, 2), generator=g) * 200
    wh = 10 + torch.rand((k, 2), generator=g) * 40
    return torch.cat([xy, xy + wh], dim=1)


def test_jitter_uncertainty_stable_teacher_below_the_bar_noisy_above():
    torch.manual_seed(0)
    boxes = [_boxes(200, 0), _boxes(50, 1)]
    labels = [torch.ones(200, dtype=torch.int64), torch.ones(50, dtype=torch.int64)]
    times, scale = 10, 0.06

    def follows_the_jitter(jittered, _labels):  # a teacher whose box head does nothing
        return jittered

    def snaps_back(jittered, _labels):  # pulls every copy back to its box, within 0.5% of its size
        out = []
        for b in boxes:
            original = b.repeat(times, 1)
            wh = (original[:, 2:] - original[:, :2]).repeat(1, 2)
            out.append(original + 0.005 * wh * torch.randn_like(original))
        return out

    noisy = torch.cat(jitter_uncertainty(boxes, labels, follows_the_jitter, times, scale))
    stable = torch.cat(jitter_uncertainty(boxes, labels, snaps_back, times, scale))
    # the sample std of 10 Gaussians is c4(10) = 0.9727 sigma on average: 0.06 x 0.9727 = 0.0584
    assert noisy.mean().item() == pytest.approx(0.0584, abs=0.003)
    assert (noisy > 0.02).all()
    assert stable.mean().item() == pytest.approx(0.005 * 0.9727, abs=0.001)
    assert (stable < 0.02).all()

    def exact(jittered, _labels):
        return [b.repeat(times, 1) for b in boxes]

    assert all(torch.count_nonzero(u) == 0 for u in jitter_uncertainty(boxes, labels, exact, times, scale))


def test_teacher_refinement_decodes_in_the_teachers_frame(smoke_model):
    """The teacher's refinement applies the deltas of each box's own class (here a constant
    x-shift of class/10 of the width: box-coder weight 10) and clips to the image; with zero
    deltas it returns the boxes themselves, so its jitter uncertainty is the jitter's."""
    model = copy.deepcopy(smoke_model)
    predictor = model.teacher.roi_heads.box_predictor
    with torch.no_grad():
        predictor.bbox_pred.weight.zero_()
        predictor.bbox_pred.bias.zero_()
        predictor.bbox_pred.bias[0::4] = torch.arange(NUM_CLASSES, dtype=torch.float32)  # dx = class
    image, _ = _image(0)
    tp = teacher_pass(model.teacher, [image], candidate_thresh=0.0)
    assert tp.image_sizes == [(128, 160)]
    assert torch.allclose(tp.to_internal[0].diagonal(), torch.tensor([1.28, 1.28, 1.0], dtype=torch.float64))
    boxes = [torch.tensor([[10.0, 20.0, 40.0, 50.0], [150.0, 100.0, 170.0, 140.0]])]
    labels = [torch.tensor([1, 3])]
    refined = refine_boxes(model.teacher, tp.features, boxes, labels, tp.image_sizes)
    # class 1: + 0.1 x 30 = 3 px; class 3: + 0.3 x 20 = 6 px, then clipped to 160 x 128
    expected = torch.tensor([[13.0, 20.0, 43.0, 50.0], [156.0, 100.0, 160.0, 128.0]])
    assert torch.allclose(refined[0], expected, atol=1e-4)
    with torch.no_grad():
        predictor.bbox_pred.bias.zero_()
    torch.manual_seed(0)
    many = [_boxes(100, 2) * 0.5]  # well inside the 128 x 160 frame
    refine = lambda b, lab: model._teacher_refine(tp, b, lab)  # noqa: E731 (the model's own closure)
    u = jitter_uncertainty(many, [torch.ones(100, dtype=torch.int64)], refine, 10, 0.06)[0]
    assert u.mean().item() == pytest.approx(0.0584, abs=0.006)
    assert (u > model.settings.max_uncertainty).all()


def test_resize_matrices_match_torchvision_resize_boxes():
    from torchvision.models.detection.transform import resize_boxes

    boxes = _boxes(20)
    m = resize_matrices([(100, 125), (520, 704)], [(128, 160), (800, 1083)], "cpu")
    for i, (old, new) in enumerate((((100, 125), (128, 160)), ((520, 704), (800, 1083)))):
        ours = boxes * torch.tensor([m[i, 0, 0], m[i, 1, 1], m[i, 0, 0], m[i, 1, 1]], dtype=torch.float32)
        assert torch.allclose(ours, resize_boxes(boxes, list(old), list(new)), atol=1e-4)


# --------------------------------------------------------------------------- losses


def test_background_weights_and_weighted_classification_loss_hand_computed():
    labels = torch.tensor([2, 0, 0, 1])
    bg = torch.tensor([0.1, 0.8, 0.3, 0.5])
    assert background_weights(labels, bg).tolist() == pytest.approx([1.0, 0.8, 0.3, 1.0])

    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])
    labels = torch.tensor([1, 0, 0])
    weights = torch.tensor([1.0, 0.5, 0.25])
    expected = (math.log(2) + 0.5 * math.log(4 / 3) + 0.25 * math.log(2)) / 1.75
    assert weighted_classification_loss(logits, labels, weights).item() == pytest.approx(expected)
    # a weight sum below 1 is not inflated (the reference's max(sum, 1))
    small = weighted_classification_loss(logits[1:], labels[1:], torch.tensor([0.2, 0.3]))
    assert small.item() == pytest.approx(0.2 * math.log(4 / 3) + 0.3 * math.log(2))


def test_box_regression_loss_hand_computed():
    # 3 proposals, 2 classes + background: deltas [N, 12]; one positive of class 2
    regression = torch.zeros((3, 12))
    regression[1, 8:12] = torch.tensor([0.05, 0.0, 0.5, 0.0])
    regression[0, 4:8] = 9.0  # a background row's deltas never count
    labels = torch.tensor([0, 2, 0])
    targets = torch.zeros((3, 4))
    # smooth L1 (beta 1/9): |0.05| < beta -> 0.5 x 0.05^2 / beta; |0.5| >= beta -> 0.5 - beta / 2;
    # summed, over the 3 sampled proposals
    expected = (0.5 * 0.05**2 * 9 + (0.5 - 1 / 18)) / 3
    assert box_regression_loss(regression, labels, targets).item() == pytest.approx(expected)


# ------------------------------------------------------------ a training step, end to end

ORIGINAL_BOXES = torch.tensor(
    [[20.0, 30.0, 50.0, 60.0], [70.0, 20.0, 100.0, 44.0], [40.0, 60.0, 70.0, 90.0], [80.0, 60.0, 110.0, 85.0]]
)
SCORES = torch.tensor([0.95, 0.92, 0.6, 0.3])
LABELS = torch.tensor([1, 2, 3, 1])
UNCERTAINTY = torch.tensor([0.01, 0.03, 0.01, 0.0])
WEAK = view_matrix(*IMAGE_HW, hflip=True, scale=1.1, shift=(2.0, -3.0))
STRONG = view_matrix(*IMAGE_HW, vflip=True, scale=0.9, shift=(-4.0, 5.0))


def _by_hand(boxes: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """Boxes through an axis-aligned matrix, corner by corner in numpy (independent code)."""
    out = []
    for x0, y0, x1, y1 in boxes.tolist():
        xs = [matrix[0, 0] * x + matrix[0, 2] for x in (x0, x1)]
        ys = [matrix[1, 1] * y + matrix[1, 2] for y in (y0, y1)]
        out.append([min(xs), min(ys), max(xs), max(ys)])
    return torch.tensor(out, dtype=torch.float32)


def _fixed_teacher(model: SoftTeacher, weak: torch.Tensor):
    """Patch the teacher's pseudo-labels to known boxes (in the teacher's frame: weak view x1.28)."""
    tp = teacher_pass(model.teacher, [weak], candidate_thresh=0.0)
    tp.boxes = [_by_hand(ORIGINAL_BOXES, np.diag([1.28, 1.28, 1.0]) @ WEAK)]
    tp.scores, tp.labels = [SCORES.clone()], [LABELS.clone()]
    return tp, [UNCERTAINTY.clone()]


def _batch(weak_image: torch.Tensor, strong_image: torch.Tensor) -> dict:
    labeled, boxes = _image(1, "astro")
    target = {"boxes": boxes, "labels": torch.full((len(boxes),), 3, dtype=torch.int64)}
    return {
        "labeled": ([labeled], [target]),
        "weak": [weak_image],
        "strong": [strong_image],
        "weak_matrix": torch.from_numpy(WEAK)[None],
        "strong_matrix": torch.from_numpy(STRONG)[None],
    }


def test_training_step_maps_teacher_boxes_onto_the_student_view(smoke_model, monkeypatch):
    model = copy.deepcopy(smoke_model)
    model.train()
    image, _ = _image(0)
    tp, unc = _fixed_teacher(model, image)
    monkeypatch.setattr(model, "teacher_pseudo_labels", lambda weak: (tp, unc))
    seen: dict = {}

    def spy_rpn(module, args):
        seen["rpn"] = args[2]  # (images, features, targets)

    model.student.rpn.register_forward_pre_hook(spy_rpn)
    heads = model.student.roi_heads
    select = heads.select_training_samples

    def spy_select(proposals, targets):
        out = select(proposals, targets)
        seen.setdefault("select", []).append((targets, out[0]))
        return out

    monkeypatch.setattr(heads, "select_training_samples", spy_select)
    probe = model_module.class_probabilities

    def spy_probs(teacher, features, boxes, sizes, chunk):
        seen["to_teacher"] = boxes
        return probe(teacher, features, boxes, sizes, chunk)

    monkeypatch.setattr(model_module, "class_probabilities", spy_probs)
    out = model.training_step(_batch(image, image))

    # student frame = strong view x1.28; the classification/RPN pseudo-boxes are boxes 0 and 1
    expected = _by_hand(ORIGINAL_BOXES, np.diag([1.28, 1.28, 1.0]) @ STRONG)
    assert torch.allclose(seen["rpn"][0]["boxes"], expected[[0, 1]], atol=1e-3)
    (cls_targets, cls_sampled), (reg_targets, _) = seen["select"][-2:]  # after the supervised one
    assert cls_targets[0]["labels"].tolist() == [1, 2]
    # regression: score >= 0.5 and uncertainty < 0.02 -> boxes 0 and 2
    assert torch.allclose(reg_targets[0]["boxes"], expected[[0, 2]], atol=1e-3)
    assert reg_targets[0]["labels"].tolist() == [1, 3]
    assert out["pseudo_boxes_per_image"].item() == 2 and out["reg_boxes_per_image"].item() == 2
    assert out["uncertainty_kept_fraction"].item() == pytest.approx(2 / 3)
    # the student's sampled proposals go back into the teacher's frame for the background scores:
    # the pseudo-boxes (always among the sampled, as gt proposals) land on the teacher's boxes
    back = seen["to_teacher"][0]
    for box_student, box_teacher in zip(expected[[0, 1]], tp.boxes[0][[0, 1]], strict=True):
        rows = torch.where((cls_sampled[0] - box_student).abs().amax(1) < 1e-3)[0]
        assert len(rows) >= 1
        assert torch.allclose(back[rows], box_teacher.expand(len(rows), 4), atol=1e-3)
    losses = {k: v for k, v in out.items() if k.startswith("loss")}
    assert all(torch.isfinite(v) for v in losses.values())
    assert out["loss_unsup_rpn_box_reg"].item() > 0 and out["loss_unsup_box_reg"].item() > 0
    # total = supervised + 4 x unsupervised: the unsup loss terms carry the weight, the stat does not
    unsup = sum(v.item() for k, v in losses.items() if k.startswith("loss_unsup_"))
    assert unsup == pytest.approx(model.settings.unsup_weight * out["unsup_loss"].item(), rel=1e-5)
    sup = sum(v.item() for k, v in losses.items() if k.startswith("loss_sup_"))
    assert sup == pytest.approx(out["sup_loss"].item(), rel=1e-5)


def test_teacher_background_scores_change_the_classification_loss(smoke_model, monkeypatch):
    """A teacher sure that the background proposals are background (weights ~1) and one sure
    they are cells (weights ~0) give different unsupervised classification losses, each the
    hand formula; nothing else changes."""
    image, _ = _image(0)
    results, captured = {}, {}
    weighted = model_module.weighted_classification_loss

    def spy(logits, labels, weights):
        captured["args"] = (logits.detach(), labels, weights)
        return weighted(logits, labels, weights)

    monkeypatch.setattr(model_module, "weighted_classification_loss", spy)
    for name, bias in (("sure_background", 20.0), ("sure_cell", -20.0)):
        model = copy.deepcopy(smoke_model)
        model.train()
        tp, unc = _fixed_teacher(model, image)
        monkeypatch.setattr(model, "teacher_pseudo_labels", lambda weak, tp=tp, unc=unc: (tp, unc))
        with torch.no_grad():
            model.teacher.roi_heads.box_predictor.cls_score.bias[0] = bias
        torch.manual_seed(0)
        out = model.training_step(_batch(image, image))
        logits, labels, weights = captured["args"]
        results[name] = (out, logits, labels, weights)

    bg_out, bg_logits, bg_labels, bg_w = results["sure_background"]
    fg_out, fg_logits, fg_labels, fg_w = results["sure_cell"]
    assert torch.equal(bg_labels, fg_labels) and torch.allclose(bg_logits, fg_logits)
    background = bg_labels == 0
    assert background.any() and (~background).any()
    assert torch.allclose(bg_w[background], torch.ones(int(background.sum())), atol=1e-6)
    assert fg_w[background].max() < 1e-6
    assert torch.all(bg_w[~background] == 1) and torch.all(fg_w[~background] == 1)
    assert bg_out["background_weight"].item() == pytest.approx(1.0, abs=1e-6)
    assert fg_out["background_weight"].item() < 1e-6
    lam = 4.0
    # weights ~1: the plain mean cross-entropy; weights ~0: the mean over the foreground only
    plain = F.cross_entropy(bg_logits, bg_labels).item()
    foreground = F.cross_entropy(bg_logits[~background], bg_labels[~background]).item()
    assert bg_out["loss_unsup_classifier"].item() == pytest.approx(lam * plain, rel=1e-4)
    assert fg_out["loss_unsup_classifier"].item() == pytest.approx(lam * foreground, rel=1e-3)
    assert abs(bg_out["loss_unsup_classifier"].item() - fg_out["loss_unsup_classifier"].item()) > 1e-3
    for key in ("loss_sup_classifier", "loss_unsup_objectness", "loss_unsup_box_reg"):
        assert bg_out[key].item() == pytest.approx(fg_out[key].item(), rel=1e-5)
