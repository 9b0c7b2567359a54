"""Cascade R-CNN / Cascade Mask R-CNN (cellmask.models.cascade_rcnn) on tiny CPU models.

A tiny conv + torchvision FPN backbone keeps every test fast; the last test builds the model
through ``cellmask.models.backbones.build_backbone`` with reduced timm bodies.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from cellmask import config, models
from cellmask.models.cascade_rcnn import (
    CascadeRCNN,
    CascadeRoIHeads,
    build_cascade_rcnn,
    build_cascade_roi_heads,
)
from cellmask.models.segmenter import PastedMasks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NUM_CLASSES = 4  # background + shsy5y, cort, astro
SIZE = 128


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyFPN(nn.Module):
    """Four stride-4..32 conv stages + torchvision's FPN (P2..P6, keys '0'..'3','pool')."""

    def __init__(self, out_channels: int = 32, chans: tuple[int, ...] = (16, 24, 32, 48)) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4, cout), nn.ReLU(inplace=True)
            )

        self.stem = nn.Sequential(block(3, chans[0], 2), block(chans[0], chans[0], 2))
        self.stages = nn.ModuleList(
            [block(chans[0], chans[0], 1)] + [block(chans[i - 1], chans[i], 2) for i in range(1, 4)]
        )
        self.fpn = FeaturePyramidNetwork(list(chans), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)
        feats = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            feats[str(i)] = x
        return self.fpn(feats)


def tiny_cfg(**sections) -> dict:
    """The smoke ``model`` section of branch 2 sized for 128x128 images; ``sections`` are merged
    in (mappings key by key, anything else replaces)."""
    cfg = config.load_config(CONFIGS / "cascade_rcnn_resnext101.yaml", profile="smoke")["model"]
    cfg = config.deep_merge(
        cfg,
        {
            "rpn": {
                "pre_nms_top_n_train": 300,
                "pre_nms_top_n_test": 300,
                "post_nms_top_n_train": 200,
                "post_nms_top_n_test": 200,
                "batch_size_per_image": 128,
            },
            "transform": {"min_size": SIZE, "max_size": SIZE},
            "mask": {"layers": [32, 32], "dim_reduced": 32},
        },
    )
    for key, value in sections.items():
        cfg[key] = config.deep_merge(cfg[key], value) if isinstance(value, dict) else value
    return cfg


def tiny_model(num_classes: int = NUM_CLASSES, **sections) -> CascadeRCNN:
    return build_cascade_rcnn(tiny_cfg(**sections), num_classes, backbone=TinyFPN())


def synth_image(seed: int, n_cells: int, label: int, size: tuple[int, int] = (SIZE, SIZE)):
    """Bright non-overlapping ellipses on a noisy gray background -> (image [3,H,W], target)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    img = 0.3 + 0.05 * rng.standard_normal((h, w))
    occupied = np.zeros((h, w), dtype=bool)
    boxes, masks = [], []
    for _ in range(500):
        if len(boxes) == n_cells:
            break
        a, b = rng.uniform(6, 14, 2)
        cy, cx = rng.uniform(16, h - 16), rng.uniform(16, w - 16)
        th = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        m = (u / a) ** 2 + (v / b) ** 2 <= 1
        if (m & occupied).any():
            continue
        occupied |= m
        img[m] += 0.5
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])  # pixel-edge xyxy
        masks.append(m)
    image = torch.from_numpy(np.clip(img, 0, 1).astype(np.float32))[None].repeat(3, 1, 1)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.full((len(boxes),), label, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)),
    }
    return image, target


def boxes_only(targets):
    return [{k: v for k, v in t.items() if k != "masks"} for t in targets]


def shifted(box: list[float], iou: float) -> list[float]:
    """``box`` shifted right so that its IoU with ``box`` is exactly ``iou``."""
    x0, y0, x1, y1 = box
    w = x1 - x0
    dx = w * (1 - iou) / (1 + iou)  # overlap (w-dx)/(w+dx) = iou
    return [x0 + dx, y0, x1 + dx, y1]


def hand_features(
    channels: int = 32, size: int = SIZE, requires_grad: bool = False
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    feats = OrderedDict()
    for i, stride in enumerate((4, 8, 16, 32)):
        s = size // stride
        feats[str(i)] = torch.randn(1, channels, s, s, generator=g).requires_grad_(requires_grad)
    return feats


# ---------------------------------------------------------------------------------------- config


def test_paper_profile_has_the_cascade_rcnn_settings():
    paper = config.load_config(CONFIGS / "cascade_rcnn_resnext101.yaml")["model"]
    heads = build_cascade_roi_heads(paper, in_channels=32, num_classes=NUM_CLASSES, with_mask=False)
    assert heads.num_stages == 3
    assert [m.high_threshold for m in heads.proposal_matchers] == [0.5, 0.6, 0.7]
    assert [m.low_threshold for m in heads.proposal_matchers] == [0.5, 0.6, 0.7]
    assert not any(m.allow_low_quality_matches for m in heads.proposal_matchers)
    assert all(m.chunk == paper["roi"]["match_chunk"] for m in heads.proposal_matchers)
    assert [tuple(c.weights) for c in heads.box_coders] == [
        (10.0, 10.0, 5.0, 5.0),
        (20.0, 20.0, 10.0, 10.0),
        (30.0, 30.0, 15.0, 15.0),
    ]
    assert heads.stage_loss_weights == [1.0, 0.5, 0.25]
    assert heads.smooth_l1_beta == 1.0  # mmdet's cascade bbox heads (the docstring says so too)
    assert heads.detections_per_img == paper["roi"]["detections_per_img"] >= 3000
    assert heads.fg_bg_sampler.batch_size_per_image == 512
    assert heads.fg_bg_sampler.positive_fraction == 0.25
    for pred in heads.box_predictors:  # class logits per class, class-agnostic regression
        assert pred.cls_score.out_features == NUM_CLASSES
        assert pred.bbox_pred.out_features == 4
    assert not heads.has_mask()


def test_box_loss_uses_the_configured_smooth_l1_beta():
    g = torch.Generator().manual_seed(0)
    logits, deltas = torch.randn(6, NUM_CLASSES, generator=g), torch.randn(6, 4, generator=g)
    labels, targets = [torch.tensor([1, 0, 2, 3, 0, 1])], [torch.randn(6, 4, generator=g) * 2]
    pos = labels[0] > 0
    for beta in (1.0, 1 / 9):
        heads = build_cascade_roi_heads(
            tiny_cfg(cascade={"smooth_l1_beta": beta}),
            in_channels=32,
            num_classes=NUM_CLASSES,
            with_mask=False,
        )
        _, loss = heads.box_loss(logits, deltas, labels, targets)
        diff = (deltas[pos] - targets[0][pos]).abs()
        expected = torch.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta).sum() / 6
        assert torch.allclose(loss, expected), beta


def test_config_sections_reach_the_model():
    model = tiny_model(
        cascade={
            "iou_thresholds": [0.4, 0.55],
            "bbox_reg_weights": [[1, 1, 1, 1], [2, 2, 2, 2]],
            "stage_loss_weights": [1, 0.3],
        },
        roi={"nms_thresh": 0.3, "score_thresh": 0.2, "detections_per_img": 1000},
        rpn={"nms_thresh": 0.6},
        transform={
            "min_size": 100,
            "max_size": 160,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.25, 0.25, 0.25],
        },
    )
    heads = model.roi_heads
    assert heads.num_stages == 2 and heads.iou_thresholds == [0.4, 0.55]
    assert heads.stage_loss_weights == [1.0, 0.3]
    assert (heads.nms_thresh, heads.score_thresh, heads.detections_per_img) == (0.3, 0.2, 1000)
    assert model.rpn.nms_thresh == 0.6
    assert model.rpn._post_nms_top_n == {"training": 200, "testing": 200}
    assert model.rpn.anchor_generator.num_anchors_per_location() == [5] * 5
    assert model.transform.min_size == (100,) and model.transform.max_size == 160
    assert model.transform.image_mean == [0.5] * 3 and model.transform.image_std == [0.25] * 3
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny_model(cascade={"iou_thresholds": [0.5, 0.6, 0.7], "stage_loss_weights": [1.0]})
    cfg = tiny_cfg()
    del cfg["cascade"]["smooth_l1_beta"]
    with pytest.raises(ValueError, match=r"model\.cascade\.smooth_l1_beta"):
        build_cascade_rcnn(cfg, NUM_CLASSES, backbone=TinyFPN())


def test_class_dependent_prefixes_cover_exactly_the_class_shaped_weights():
    for mask in (False, True):
        typ = "cascade_mask_rcnn" if mask else "cascade_rcnn"
        torch.manual_seed(0)
        a = build_cascade_rcnn(tiny_cfg(type=typ), 4, backbone=TinyFPN()).state_dict()
        b_model = build_cascade_rcnn(tiny_cfg(type=typ), 9, backbone=TinyFPN())
        b = b_model.state_dict()
        prefixes = b_model.class_dependent_prefixes()
        assert len(prefixes) == 3 + mask
        assert all(any(k.startswith(p) for k in b) for p in prefixes)
        differ = {k for k in a if a[k].shape != b[k].shape}
        covered = {k for k in a if any(k.startswith(p) for p in prefixes)}
        assert differ == covered
        assert not any("bbox_pred" in k for k in covered)  # class-agnostic regression stays


# ---------------------------------------------------------------------------------- stage targets


def test_each_stage_matches_positives_only_at_its_iou_threshold():
    heads = build_cascade_roi_heads(tiny_cfg(), in_channels=32, num_classes=NUM_CLASSES, with_mask=False)
    gt = [20.0, 20.0, 60.0, 60.0]
    ious = [0.3, 0.45, 0.52, 0.58, 0.62, 0.68, 0.72, 0.9]
    proposals = torch.tensor([shifted(gt, t) for t in ious])
    got = box_iou(torch.tensor([gt]), proposals)[0]
    assert torch.allclose(got, torch.tensor(ious), atol=1e-5)
    gt_boxes, gt_labels = [torch.tensor([gt])], [torch.tensor([3])]
    for stage, thresh in enumerate((0.5, 0.6, 0.7)):
        matched, labels = heads.assign_targets_to_proposals(stage, [proposals], gt_boxes, gt_labels)
        expected = torch.tensor([3 if t >= thresh else 0 for t in ious])
        assert torch.equal(labels[0], expected), (stage, labels[0])
        assert torch.equal(matched[0], torch.zeros(len(ious), dtype=torch.int64))

    # sampling appends the gt box (a positive at every stage) and encodes with the stage's coder
    target = [{"boxes": gt_boxes[0], "labels": gt_labels[0]}]
    for stage, thresh in enumerate((0.5, 0.6, 0.7)):
        rois, _, labels, reg, is_gt = heads.select_training_samples(stage, [proposals], target)
        assert rois[0].shape[0] == len(ious) + 1  # fewer RoIs than batch_size_per_image: all kept
        assert is_gt[0].tolist() == [False] * len(ious) + [True]
        assert torch.equal(rois[0][-1], gt_boxes[0][0])
        assert torch.equal(labels[0], torch.tensor([3 if t >= thresh else 0 for t in ious] + [3]))
        w = torch.tensor(heads.box_coders[stage].weights)
        x0, _, x1, _ = rois[0].unbind(1)
        gx0, _, gx1, _ = gt
        expected_dx = w[0] * ((gx0 + gx1) / 2 - (x0 + x1) / 2) / (x1 - x0)
        expected_dw = w[2] * torch.log((gx1 - gx0) / (x1 - x0))
        assert torch.allclose(reg[0][:, 0], expected_dx, atol=1e-4)
        assert torch.allclose(reg[0][:, 2], expected_dw, atol=1e-4)


def test_later_stages_get_previous_stage_refined_detached_boxes(monkeypatch):
    torch.manual_seed(0)
    heads = build_cascade_roi_heads(tiny_cfg(), in_channels=32, num_classes=NUM_CLASSES, with_mask=False)
    for pred in heads.box_predictors:  # visible refinements
        nn.init.normal_(pred.bbox_pred.weight, std=0.05)
        nn.init.normal_(pred.bbox_pred.bias, std=0.3)
    heads.train()
    gt = torch.tensor([[20.0, 20.0, 60.0, 60.0], [70.0, 64.0, 100.0, 110.0]])
    proposals = torch.tensor(
        [shifted(gt[0].tolist(), t) for t in (0.55, 0.65, 0.8, 0.95)]
        + [shifted(gt[1].tolist(), t) for t in (0.3, 0.62, 0.75)]
        + [[0.0, 0.0, 10.0, 10.0], [100.0, 5.0, 125.0, 30.0]]
    )
    targets = [{"boxes": gt, "labels": torch.tensor([1, 2])}]
    calls = []
    run_stage = CascadeRoIHeads.run_stage

    def spy(self, stage, features, rois, image_shapes):
        out = run_stage(self, stage, features, rois, image_shapes)
        calls.append(
            (stage, [r.clone() for r in rois], rois[0].requires_grad, rois[0].grad_fn, out[1].detach())
        )
        return out

    monkeypatch.setattr(CascadeRoIHeads, "run_stage", spy)
    feats = hand_features(requires_grad=True)
    losses = heads(feats, [proposals], [(SIZE, SIZE)], targets)[1]
    assert sorted(losses) == sorted(f"loss_{n}_s{k}" for n in ("classifier", "box_reg") for k in (1, 2, 3))
    assert [c[0] for c in calls] == [0, 1, 2]
    n_gt = len(gt)
    for prev, cur in itertools.pairwise(calls):
        assert cur[2] is False and cur[3] is None  # detached: no autograd path into the boxes
        prev_rois, prev_deltas = prev[1][0], prev[4]
        refined = heads.box_coders[prev[0]].decode_single(prev_deltas, prev_rois)
        refined = refined.clamp(min=0, max=SIZE)
        expected = torch.cat([refined[:-n_gt], gt])  # refined proposals (not the gt copies) + gt afresh
        assert not torch.allclose(refined[:-n_gt], prev_rois[:-n_gt])  # the boxes really moved
        assert torch.allclose(cur[1][0], expected, atol=1e-4)

    # a later stage's loss reaches the shared features but no earlier stage's parameters
    later = losses["loss_classifier_s2"] + losses["loss_box_reg_s2"]
    later = later + losses["loss_classifier_s3"] + losses["loss_box_reg_s3"]
    stage1 = list(heads.box_heads[0].parameters()) + list(heads.box_predictors[0].parameters())
    grads = torch.autograd.grad(later, [*stage1, feats["0"]], allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads[:-1])
    assert grads[-1] is not None and grads[-1].abs().sum() > 0
    first = losses["loss_classifier_s1"] + losses["loss_box_reg_s1"]
    first = torch.autograd.grad(first, stage1, allow_unused=True)
    assert all(g is not None for g in first)


def test_stage_losses_are_scaled_by_the_stage_weights():
    gt = torch.tensor([[20.0, 20.0, 60.0, 60.0]])
    proposals = torch.tensor(
        [shifted(gt[0].tolist(), t) for t in (0.55, 0.75, 0.9)] + [[80.0, 80.0, 120.0, 120.0]]
    )
    targets = [{"boxes": gt, "labels": torch.tensor([1])}]
    feats = hand_features()
    out = {}
    for weights in ([1.0, 1.0, 1.0], [1.0, 0.5, 0.25]):
        torch.manual_seed(0)
        heads = build_cascade_roi_heads(
            tiny_cfg(cascade={"stage_loss_weights": weights}),
            in_channels=32,
            num_classes=NUM_CLASSES,
            with_mask=False,
        ).train()
        torch.manual_seed(1)
        out[tuple(weights)] = heads(feats, [proposals], [(SIZE, SIZE)], targets)[1]
    plain, weighted = out[(1.0, 1.0, 1.0)], out[(1.0, 0.5, 0.25)]
    for k, w in ((1, 1.0), (2, 0.5), (3, 0.25)):
        for name in ("classifier", "box_reg"):
            key = f"loss_{name}_s{k}"
            assert torch.allclose(weighted[key], plain[key] * w), key


# ---------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained():
    """A tiny Cascade R-CNN trained 100 AdamW steps on two synthetic images (~15 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = [synth_image(1, 6, label=1), synth_image(2, 6, label=2)]
    images = [d[0] for d in data]
    targets = boxes_only([d[1] for d in data])
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    model.train()
    history = []
    for _ in range(100):
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    model.eval()
    torch.set_num_threads(before)
    return model, images, targets, history


@pytest.mark.numerics
def test_loss_falls_over_40_adamw_steps(trained):
    history = trained[3]
    assert set(history[0]) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        *(f"loss_{n}_s{k}" for n in ("classifier", "box_reg") for k in (1, 2, 3)),
    }
    totals = [sum(h.values()) for h in history]
    assert all(np.isfinite(totals))
    assert np.mean(totals[35:40]) < 0.8 * np.mean(totals[:3])
    classifier = [sum(h[f"loss_classifier_s{k}"] for k in (1, 2, 3)) for h in history]
    assert np.mean(classifier[35:40]) < 0.5 * classifier[0]


@pytest.mark.numerics
def test_overfit_detections_hit_the_gt_boxes(trained):
    model, images, targets, _ = trained
    with torch.no_grad():
        outputs = model(images)
    for out, target in zip(outputs, targets, strict=True):
        assert set(out) == {"boxes", "labels", "scores"}
        keep = out["scores"] > 0.5
        assert keep.sum() >= len(target["boxes"]) // 2
        iou = box_iou(target["boxes"], out["boxes"][keep])
        best, idx = iou.max(dim=1)
        hit = best > 0.5
        assert hit.float().mean() >= 0.8, best
        assert torch.equal(out["labels"][keep][idx[hit]], target["labels"][hit])
        assert torch.all(out["scores"][:-1] >= out["scores"][1:])  # sorted by score


@pytest.mark.numerics
def test_eval_boxes_under_autocast_are_float32_and_close_to_float32_ones(trained):
    from test_autocast import assert_eval_under_autocast_close

    model, images, _, _ = trained
    assert_eval_under_autocast_close(model, images, min_confident=3)


# ---------------------------------------------------------------------------------- inference


def test_eval_scores_average_each_stages_logits_on_its_own_rois_as_mmdet_does(monkeypatch):
    """mmdet 2.x ``CascadeRoIHead.simple_test`` (the paper's code): stage k classifies and
    regresses its own RoIs (stage 1 the proposals, stage k+1 stage k's refinement of them), the
    class scores are the softmax of the stages' mean logits, the boxes the last stage's regression
    of its RoIs. The reference is rebuilt here from the parts. The heads are set so that every
    stage moves the boxes and every classifier depends on the RoI's features, a case where the
    earlier definition (every classifier on the last stage's RoIs, softmaxes averaged) differs."""
    torch.manual_seed(0)
    cfg = tiny_cfg(roi={"score_thresh": 0.0, "detections_per_img": 1000})
    heads = build_cascade_roi_heads(cfg, in_channels=32, num_classes=NUM_CLASSES, with_mask=False).eval()
    with torch.no_grad():
        for pred in heads.box_predictors:
            nn.init.normal_(pred.cls_score.weight, std=1.0)  # logits depend on the RoI features
            nn.init.normal_(pred.cls_score.bias, std=1.0)
            nn.init.normal_(pred.bbox_pred.weight, std=0.05)  # visible refinements
            nn.init.normal_(pred.bbox_pred.bias, std=0.5)
    feats = hand_features()
    shapes = [(SIZE, SIZE)]
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(24, 2, generator=g) * (SIZE - 40)
    proposals = torch.cat([xy, xy + 12 + torch.rand(24, 2, generator=g) * 28], 1)
    seen = {}
    postprocess = CascadeRoIHeads.postprocess_detections

    def spy(self, probs, boxes, per_image, image_shapes):
        seen.update(probs=probs, boxes=boxes, per_image=per_image)
        return postprocess(self, probs, boxes, per_image, image_shapes)

    monkeypatch.setattr(CascadeRoIHeads, "postprocess_detections", spy)
    with torch.no_grad():
        out = heads(feats, [proposals], shapes)[0][0]
        rois, own_rois, logits = proposals, [], []
        for k in range(heads.num_stages):
            x = heads.box_heads[k](heads.box_roi_pool(feats, [rois], shapes))
            cls, deltas = heads.box_predictors[k](x)
            own_rois.append(rois)
            logits.append(cls)
            rois = heads.box_coders[k].decode_single(deltas, rois).clamp(min=0, max=SIZE)
        reference = F.softmax(torch.stack(logits).mean(0), dim=1)
        last = heads.box_roi_pool(feats, [own_rois[-1]], shapes)
        on_last = torch.stack([heads.box_predictors[k](heads.box_heads[k](last))[0] for k in range(3)])
        earlier = F.softmax(on_last, dim=2).mean(0)  # every classifier on the last RoIs, softmax mean
        # each half of the difference on its own
        last_rois_logit_mean = F.softmax(on_last.mean(0), dim=1)
        own_rois_softmax_mean = F.softmax(torch.stack(logits), dim=2).mean(0)
    for a, b in itertools.pairwise(own_rois):
        assert (a - b).abs().max() > 1.0  # each stage really moves the boxes
    assert seen["per_image"] == [len(proposals)]
    torch.testing.assert_close(seen["probs"], reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["boxes"], heads.box_coders[-1].decode_single(deltas, own_rois[-1]))
    for other in (earlier, last_rois_logit_mean, own_rois_softmax_mean):
        assert (reference - other).abs().max() > 0.05  # the definitions disagree here
    assert len(out["scores"]) > 0 and set(out["labels"].tolist()) <= {1, 2, 3}
    assert (out["scores"] <= reference[:, 1:].max() + 1e-6).all()


def test_detections_per_img_is_honoured():
    image, _ = synth_image(4, 6, label=2)
    counts = {}
    for limit in (5, 1000):
        torch.manual_seed(0)
        model = tiny_model(roi={"score_thresh": 0.0, "detections_per_img": limit}).eval()
        with torch.no_grad():
            out = model([image])[0]
        counts[limit] = len(out["boxes"])
        assert len(out["labels"]) == len(out["scores"]) == counts[limit] <= limit
    assert counts[5] == 5
    assert 5 < counts[1000] <= 1000  # untrained, threshold 0: many candidates, none cut at 5 or 100


def test_empty_images_train_and_predict():
    torch.manual_seed(0)
    model = tiny_model(type="cascade_mask_rcnn")
    image, target = synth_image(5, 3, label=3)
    empty = {
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros((0, SIZE, SIZE), dtype=torch.uint8),
    }
    losses = model.train()([image, torch.full_like(image, 0.3)], [target, empty])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    model.roi_heads.score_thresh = 1.1  # nothing survives
    with torch.no_grad():
        out = model([image])[0]
    assert out["boxes"].shape == (0, 4) and len(out["masks"]) == 0 and out["masks"].image_size == (SIZE, SIZE)


# ---------------------------------------------------------------------------------- mask head


@pytest.mark.numerics
def test_cascade_mask_rcnn_trains_a_mask_head_and_pastes_masks_at_original_size():
    torch.manual_seed(0)
    model = tiny_model(type="cascade_mask_rcnn", roi={"score_thresh": 0.0, "detections_per_img": 20})
    assert model.roi_heads.has_mask()
    assert model.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == NUM_CLASSES
    assert "roi_heads.mask_predictor.mask_fcn_logits" in model.class_dependent_prefixes()
    assert tiny_model(mask={"enabled": True}).roi_heads.has_mask()  # the flag works too
    assert not tiny_model().roi_heads.has_mask()

    data = [synth_image(6, 4, label=1, size=(96, 120)), synth_image(7, 4, label=3, size=(96, 120))]
    images, targets = [d[0] for d in data], [d[1] for d in data]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(8):
        losses = model(images, targets)
        assert "loss_mask" in losses
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append(losses["loss_mask"].item())
    assert all(np.isfinite(history)) and history[-1] < history[0]
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad is not None
    with pytest.raises(ValueError, match="masks"):
        model(images, boxes_only(targets))

    model.eval()
    with torch.no_grad():
        out = model(images[:1])[0]  # 96x120 is resized to 128x160 inside, pasted back at 96x120
    n = len(out["boxes"])
    assert 0 < n <= 20
    assert isinstance(out["masks"], PastedMasks)  # windows in original pixels, no K x H x W floats
    assert len(out["masks"]) == n and out["masks"].image_size == (96, 120)
    assert all(w.dtype == torch.bool for w in out["masks"].windows)
    assert out["boxes"][:, 2].max() <= 120 and out["boxes"][:, 3].max() <= 96


def test_mask_loss_from_windows_equals_the_loss_from_full_image_masks():
    """The datasets' MaskWindows (each truth cropped to its box) and the full-image uint8 stack
    give the same training losses and gradients, bit for bit."""
    from cellmask.data.layers import MaskWindows

    torch.manual_seed(0)
    model = tiny_model(type="cascade_mask_rcnn").train()
    data = [synth_image(6, 4, label=1, size=(96, 120)), synth_image(7, 4, label=3, size=(96, 120))]
    images, targets = [d[0] for d in data], [d[1] for d in data]
    windowed = [{**t, "masks": MaskWindows.from_dense(t["masks"])} for t in targets]
    assert all(
        w["masks"].data.numel() < t["masks"].numel() / 2 for w, t in zip(windowed, targets, strict=True)
    )
    results = []
    for batch in (targets, windowed):
        model.zero_grad()
        torch.manual_seed(1)  # the same RoI sampling
        losses = model(images, batch)
        losses["loss_mask"].backward()
        grad = model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.clone()
        results.append((losses, grad))
    (dense_losses, dense_grad), (window_losses, window_grad) = results
    assert dense_losses["loss_mask"] > 0
    assert all(torch.equal(dense_losses[k], window_losses[k]) for k in dense_losses)
    assert torch.equal(dense_grad, window_grad)


# ---------------------------------------------------------------------------------- real backbones


@pytest.mark.parametrize(
    "name", ["cascade_rcnn_resnext101", "cascade_rcnn_resnest101", "cascade_mask_rcnn_resnext101"]
)
def test_smoke_configs_build_through_build_detector(name):
    path = CONFIGS / f"{name}.yaml"
    model_cfg = config.load_config(path, profile="smoke")["model"]
    torch.manual_seed(0)
    model = models.build_detector(model_cfg, NUM_CLASSES)
    assert isinstance(model, CascadeRCNN)
    with_mask = name.startswith("cascade_mask")
    assert model.roi_heads.has_mask() == with_mask
    assert model.roi_heads.iou_thresholds == [0.5, 0.6, 0.7]
    image, target = synth_image(8, 3, label=2, size=(104, 140))
    losses = model.train()([image], [target if with_mask else boxes_only([target])[0]])
    assert ("loss_mask" in losses) == with_mask
    assert {"loss_classifier_s3", "loss_box_reg_s3", "loss_objectness"} <= set(losses)
    sum(losses.values()).backward()
    with torch.no_grad():
        out = model.eval()([image])[0]
    assert out["boxes"].shape[1:] == (4,) and len(out["boxes"]) <= 100
    if with_mask:
        assert isinstance(out["masks"], PastedMasks) and out["masks"].image_size == (104, 140)


def test_swin_backbone_from_config():
    cfg = tiny_cfg(backbone={"name": "swin_tiny_patch4_window7_224", "frozen_stages": -1})
    cfg["backbone"]["kwargs"] = {"embed_dim": 24, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}
    torch.manual_seed(0)
    model = build_cascade_rcnn(cfg, NUM_CLASSES)
    assert model.backbone.out_channels == 32
    image, target = synth_image(8, 3, label=2, size=(104, 140))
    losses = model.train()([image], boxes_only([target]))
    sum(losses.values()).backward()
    with torch.no_grad():
        out = model.eval()([image])[0]
    assert out["boxes"].shape[1:] == (4,)
