"""Chunked matching equals torchvision's ``Matcher(box_iou(gt, boxes))`` exactly, and the RPN / RoI
heads that use it label anchors and proposals as torchvision's do."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import box_iou

from cellmask.models.matching import ChunkedMatcher, assign_proposals, iou_table
from cellmask.models.rpn import CellRPN

pytestmark = pytest.mark.usefixtures("one_thread")

RPN_STYLE = (0.7, 0.3, True)  # fg, bg, low-quality matches (torchvision's RPN)
ROI_STYLE = (0.5, 0.5, False)  # torchvision's RoI heads (and a cascade stage)
CASCADE_STYLE = (0.6, 0.6, False)


def anchors_for(height: int, width: int) -> torch.Tensor:
    """The cell-sized anchors of an FPN P2..P6 input (8..128 px, 5 ratios): ``[A, 4]``."""
    gen = AnchorGenerator(((8.0,), (16.0,), (32.0,), (64.0,), (128.0,)), ((0.25, 0.5, 1.0, 2.0, 4.0),) * 5)
    maps = [torch.zeros(1, 1, height // s, width // s) for s in (4, 8, 16, 32, 64)]
    return gen(ImageList(torch.zeros(1, 3, height, width), [(height, width)]), maps)[0]


def cells(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """``n`` random cell boxes (6-40 px) inside a ``height x width`` image: ``[n, 4]``."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width - 40.0, height - 40.0])
    wh = 6 + torch.rand(n, 2, generator=g) * 34
    return torch.cat([xy, xy + wh], 1)


def crowded_case() -> tuple[torch.Tensor, torch.Tensor]:
    """300 truths against ~20K anchors, with every kind of tie and degenerate box."""
    anchors = anchors_for(192, 256)
    gt = cells(300, 192, 256, seed=0)
    gt[10] = gt[11]  # duplicated truth: ties in every column it wins (first index must win)
    gt[20] = anchors[1234]  # a truth equal to an anchor (IoU exactly 1)
    gt[21] = anchors[5000] + torch.tensor([0.0, 0.0, 0.0, 0.0])
    gt[22] = torch.tensor([3000.0, 3000.0, 3010.0, 3010.0])  # overlaps nothing: best IoU 0, ties everywhere
    gt[23] = torch.tensor([50.0, 50.0, 50.0, 70.0])  # zero width
    gt[24] = anchors[777].clone()  # zero-area copies below make NaN IoUs
    anchors = anchors.clone()
    anchors[100] = anchors[101]  # duplicated anchors: a truth's maximum reached twice
    anchors[200] = torch.tensor([50.0, 50.0, 50.0, 70.0])  # zero-area anchor == zero-area truth 23: NaN
    anchors[300] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # a point
    return gt, anchors


@pytest.mark.parametrize("style", [RPN_STYLE, ROI_STYLE, CASCADE_STYLE])
@pytest.mark.parametrize("chunk", [1000, 4096, 7777, None])
def test_chunked_matching_equals_torchvision_on_a_crowded_case(style, chunk):
    gt, anchors = crowded_case()
    assert gt.shape[0] >= 300 and anchors.shape[0] >= 20000
    iou = box_iou(gt, anchors)
    assert torch.isnan(iou).any() and (iou.max(dim=1).values == 0).any()  # the edge cases are there
    expected = Matcher(*style)(iou)
    got = ChunkedMatcher(*style, chunk=chunk).match(gt, anchors)
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    assert (expected >= 0).any()
    if style[2]:
        # torchvision's quirk, reproduced: truth 22 overlaps nothing, so every anchor tied at its
        # best IoU (0) is restored to its own best truth, and no anchor is left background
        assert not (expected == -1).any()
    else:
        assert (expected == -1).any()


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 37, 512])
def test_chunked_matching_equals_torchvision_on_small_random_cases(seed, chunk):
    g = torch.Generator().manual_seed(seed)
    gt = cells(40, 64, 64, seed)
    boxes = cells(900, 64, 64, seed + 10)
    boxes[::7] = gt[torch.randint(0, 40, (len(boxes[::7]),), generator=g)]  # exact hits and ties
    for style in (RPN_STYLE, ROI_STYLE):
        expected = Matcher(*style)(box_iou(gt, boxes))
        assert torch.equal(ChunkedMatcher(*style, chunk=chunk).match(gt, boxes), expected)


@pytest.mark.parametrize("style", [RPN_STYLE, ROI_STYLE, CASCADE_STYLE])
def test_ious_exactly_at_the_thresholds(style):
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    # IoU with truth 0 exactly 0.2, 0.3, 0.5, 0.6, 0.7, 0.8 (10 x k boxes inside a 10 x 10 truth)
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, float(k)] for k in (2, 3, 5, 6, 7, 8)] * 3 + [[50.0, 50.0, 60.0, 60.0]]
    )
    iou = box_iou(gt, boxes)
    assert set(iou[0, :6].tolist()) == {torch.tensor(v).item() for v in (0.2, 0.3, 0.5, 0.6, 0.7, 0.8)}
    expected = Matcher(*style)(iou)
    assert torch.equal(ChunkedMatcher(*style, chunk=5).match(gt, boxes), expected)
    labels = expected[:6].tolist()
    fg, bg = style[0], style[1]
    for value, label in zip((0.2, 0.3, 0.5, 0.6, 0.7, 0.8), labels, strict=True):
        if value >= fg:
            assert label == 0
        elif value >= bg:
            assert label == -2
        elif not style[2]:
            assert label == -1


def test_low_quality_restoration_spans_chunks():
    # a truth whose best anchors (ties) fall in two different chunks, both below the thresholds
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    far = torch.tensor([[100.0, 100.0, 110.0, 110.0]]).repeat(10, 1)
    weak = torch.tensor([[5.0, 0.0, 15.0, 10.0]])  # IoU 1/3, between 0.3 and 0.7
    boxes = torch.cat([weak, far, weak, far])
    expected = Matcher(*RPN_STYLE)(box_iou(gt, boxes))
    assert expected[0] == 0 and expected[11] == 0 and (expected[1:11] == -1).all()
    assert torch.equal(ChunkedMatcher(*RPN_STYLE, chunk=4).match(gt, boxes), expected)


def test_empty_inputs_raise_like_torchvision():
    gt, anchors = cells(5, 64, 64, 0), cells(50, 64, 64, 1)
    for a, b in [(gt[:0], anchors), (gt, anchors[:0])]:
        with pytest.raises(ValueError) as theirs:
            Matcher(*RPN_STYLE)(box_iou(a, b))
        with pytest.raises(ValueError) as ours:
            ChunkedMatcher(*RPN_STYLE, chunk=8).match(a, b)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="chunk"):
        ChunkedMatcher(*RPN_STYLE, chunk=0)


def test_iou_table_is_box_iou_bit_for_bit():
    gt, anchors = crowded_case()
    ours, theirs = iou_table(gt, anchors[:5000]), box_iou(gt, anchors[:5000])
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    assert torch.equal(ours.nan_to_num(-1.0), theirs.nan_to_num(-1.0))


def test_rpn_labels_anchors_as_torchvision():
    anchors = anchors_for(128, 160)
    targets = [
        {"boxes": cells(150, 128, 160, seed=5)},
        {"boxes": torch.zeros((0, 4))},  # an image without truth: all background
    ]
    head = RPNHead(8, 5)
    kwargs = {
        "fg_iou_thresh": 0.7,
        "bg_iou_thresh": 0.3,
        "batch_size_per_image": 256,
        "positive_fraction": 0.5,
        "pre_nms_top_n": {"training": 100, "testing": 100},
        "post_nms_top_n": {"training": 100, "testing": 100},
        "nms_thresh": 0.7,
    }
    ours = CellRPN(AnchorGenerator(), head, match_chunk=1000, **kwargs)
    theirs = RegionProposalNetwork(AnchorGenerator(), head, **kwargs)
    got = ours.assign_targets_to_anchors([anchors, anchors], targets)
    expected = theirs.assign_targets_to_anchors([anchors, anchors], targets)
    for g, e in zip(got, expected, strict=True):
        for a, b in zip(g, e, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert (got[0][0] == 1).any() and (got[0][0] == -1).any() and (got[0][1] == 0).all()


def test_roi_heads_label_proposals_as_torchvision():
    proposals = [cells(3000, 256, 256, seed=7), cells(500, 256, 256, seed=8)]
    gt_boxes = [cells(400, 256, 256, seed=9), torch.zeros((0, 4))]
    proposals[0][:400] = gt_boxes[0] + 0.5  # plenty of positives
    gt_labels = [
        torch.randint(1, 4, (400,), generator=torch.Generator().manual_seed(0)),
        torch.zeros(0).long(),
    ]
    theirs = RoIHeads(None, None, None, 0.5, 0.4, 512, 0.25, None, 0.05, 0.5, 100)
    expected = theirs.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
    got = assign_proposals(ChunkedMatcher(0.5, 0.4, chunk=512), proposals, gt_boxes, gt_labels)
    for g, e in zip(got, expected, strict=True):
        for a, b in zip(g, e, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    labels = got[1][0]
    assert (labels > 0).any() and (labels == 0).any() and (labels == -1).any()
