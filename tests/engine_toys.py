"""Toys shared by the engine tests (tests/test_engine*.py): a tiny torchvision Faster R-CNN
(2-conv backbone, 64x64 images) standing in for the real detectors, a dataset of bright
rectangles with random augmentation, a small train config, and a model with ``training_step``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from cellmask.engine import build_eval_loader
from cellmask.engine.launch import free_port
from cellmask.training.validation import evaluate_detector

SIZE = 64
CLASS_PREFIX = "det.roi_heads.box_predictor."


class TinyDetector(nn.Module):
    """A torchvision Faster R-CNN small enough for CPU tests; ``poison`` targets give a NaN loss."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        backbone.out_channels = 16
        self.det = FasterRCNN(
            backbone,
            num_classes=None,
            rpn_anchor_generator=AnchorGenerator(sizes=((8, 16),), aspect_ratios=((0.5, 1.0, 2.0),)),
            box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
            box_head=TwoMLPHead(16 * 7 * 7, 32),
            box_predictor=FastRCNNPredictor(32, num_classes),
            min_size=SIZE,
            max_size=SIZE,
            rpn_pre_nms_top_n_train=60,
            rpn_post_nms_top_n_train=30,
            rpn_pre_nms_top_n_test=60,
            rpn_post_nms_top_n_test=30,
            rpn_batch_size_per_image=32,
            box_batch_size_per_image=32,
            box_detections_per_img=30,
            box_score_thresh=0.0,
        )

    def forward(self, images, targets=None):
        out = self.det(images, targets)
        if self.training and targets and any(bool(t.get("poison", False)) for t in targets):
            out = {**out, "loss_poison": torch.tensor(float("nan"))}
        return out

    def class_dependent_prefixes(self) -> list[str]:
        return [CLASS_PREFIX]


class ToyDataset(Dataset):
    """Bright rectangles on noise; random flip (torch RNG), brightness (numpy RNG) and a noise
    offset (python ``random``) per item."""

    def __init__(self, n: int = 6, seed: int = 0, poison: frozenset[int] = frozenset()) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            image = torch.rand(3, SIZE, SIZE, generator=g) * 0.2
            boxes = []
            for _ in range(3):
                x0, y0 = torch.randint(0, SIZE - 20, (2,), generator=g).tolist()
                w, h = torch.randint(8, 18, (2,), generator=g).tolist()
                image[:, y0 : y0 + h, x0 : x0 + w] += 0.7
                boxes.append([x0, y0, x0 + w, y0 + h])
            target = {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.randint(1, 4, (3,), generator=g),
                "image_id": i,
            }
            if i in poison:
                target["poison"] = True
            self.items.append((image.clamp(0, 1), target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        image, target = self.items[i]
        image, target = (
            image.clone(),
            {k: (v.clone() if torch.is_tensor(v) else v) for k, v in target.items()},
        )
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes = target["boxes"]
            target["boxes"] = torch.stack(
                [SIZE - boxes[:, 2], boxes[:, 1], SIZE - boxes[:, 0], boxes[:, 3]], 1
            )
        image = image * float(np.random.uniform(0.9, 1.1))  # noqa: NPY002 (global RNG on purpose)
        image = (image + random.uniform(-0.02, 0.02)).clamp(0, 1)
        return image, target


def tiny_cfg(**train) -> dict:
    return {
        "train": {
            "epochs": 2,
            "batch_size": 2,
            "optimizer": "adamw",
            "lr": 1e-3,
            "weight_decay": 1e-2,
            "scheduler": "cosine",
            "warmup_iters": 2,
            "grad_clip": 10.0,
            "amp": False,
            "num_workers": 0,
            "seed": 0,
            "progress": False,
            **train,
        },
        "model": {"type": "tiny"},
    }


def make_val_fn(dataset: Dataset, cfg: dict):
    loader = build_eval_loader(dataset, cfg)

    def val_fn(model, epoch, info):
        return evaluate_detector(model, loader, info.device, num_classes=4)

    return val_fn


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


class StepModel(nn.Module):
    """Defines ``training_step``: the engine must call it instead of ``forward``. A ``poison``
    target makes the loss NaN; ``stats`` adds a logged statistic that depends on the weights."""

    def __init__(self, stats: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.calls = 0
        self.stats = stats

    def forward(self, *args, **kwargs):
        raise AssertionError("the engine must use training_step")

    def training_step(self, batch):
        self.calls += 1
        images, targets = batch
        loss = self.lin(torch.stack(images)).pow(2).mean()
        if any(t.get("poison") for t in targets):
            loss = loss * float("nan")
        out = {"loss_l2": loss}
        if self.stats:  # statistics: never summed into the loss, even when they carry a gradient
            out["weight_sum"] = self.lin.weight.sum() * 100
            out["boxes_per_image"] = float(len(images)) * 3
        return out


def batches(poison: list[bool]):
    g = torch.Generator().manual_seed(0)
    return [([torch.randn(2, generator=g)], [{"poison": p}]) for p in poison]


def image_key(image: torch.Tensor) -> str:
    """A digest of an image's pixels (how :class:`Oracle` recognises the images it was shown)."""
    import hashlib

    return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class Oracle(nn.Module):
    """A detector that answers each image it was shown with that image's truth, imperfectly: ~20%
    of the boxes missed, the rest shifted by up to 4 px, a few false positives, scores drawn from
    three levels (so detections of different images tie). Boxes come out as float16, as a
    detector's under autocast may. Gives a COCO AP well inside (0, 1) that depends on every image."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))  # something for an optimiser to hold
        g = torch.Generator().manual_seed(seed)
        levels = torch.tensor([0.5, 0.7, 0.9])
        self.answers: dict[str, dict[str, torch.Tensor]] = {}
        for image, target in dataset:
            boxes, labels = target["boxes"].float(), target["labels"]
            kept = torch.rand(len(boxes), generator=g) > 0.2
            boxes = boxes[kept] + torch.randint(-4, 5, (int(kept.sum()), 4), generator=g).float()
            labels = labels[kept]
            false = torch.rand(max(len(boxes) // 4, 1), 2, generator=g) * 40
            boxes = torch.cat([boxes, torch.cat([false, false + 12], 1)])
            labels = torch.cat([labels, torch.ones(len(false), dtype=labels.dtype)])
            scores = levels[torch.randint(0, 3, (len(boxes),), generator=g)]
            self.answers[image_key(image)] = {
                "boxes": boxes.half(),
                "scores": scores.half(),
                "labels": labels,
            }

    def forward(self, images, targets=None):
        return [dict(self.answers[image_key(image)]) for image in images]


def spawn_ranks(worker: Any, out: str, world: int = 2, timeout_s: float = 120.0) -> None:
    """Run ``worker(rank, world, port, out)`` in ``world`` processes (gloo on the CPU) and wait;
    fail the test (killing them) after ``timeout_s``."""
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=(world, free_port(), out), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP workers did not finish in {timeout_s:.0f} s")
