"""Helpers of the inference tests: smoke "runs", built without training: a model from a smoke config,
saved as `cellmask train` leaves a run (config.yaml + a checkpoint in the engine's format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BRANCH_CONFIGS = ("faster_rcnn_swin_t.yaml", "cascade_rcnn_resnext101.yaml", "cascade_rcnn_resnest101.yaml")
SEGMENTER_CONFIG = "segmenter_upernet_swin_t.yaml"
PERMISSIVE = ["predict.score_thresholds=0.0", "predict.min_area=4", "predict.vote_min_score=0.0"]
"""Predict overrides that keep every detection (thresholds 0, tiny minimum area, every box votes)."""


def run_config(name: str, weight: float | None = None, **data: Any) -> dict:
    """The smoke profile of ``configs/<name>`` as a competition run's resolved config."""
    from cellmask.config import load_config

    cfg = load_config(CONFIGS / name, "smoke")
    cfg["data"] = {"dataset": "sartorius", "num_classes": 4, **data}
    if weight is not None:
        cfg["ensemble"] = {"weight": weight}
    return cfg


def build(cfg: dict, seed: int = 0) -> torch.nn.Module:
    from cellmask.models import build_detector
    from cellmask.models.segmenter import build_segmenter, is_segmenter_config

    torch.manual_seed(seed)
    if is_segmenter_config(cfg):
        return build_segmenter(cfg["model"])
    return build_detector(cfg["model"], num_classes=int(cfg["data"]["num_classes"]))


def save_run(
    out: Path,
    cfg: dict,
    model: torch.nn.Module | None = None,
    checkpoint: str = "best.pt",
    seed: int = 0,
    pretrained: bool = False,
) -> Path:
    """Write ``out/config.yaml`` and ``out/<checkpoint>`` (the engine's weights format); returns
    ``out``. ``pretrained``: the saved config says ``backbone.pretrained: true``, as a paper run's
    does (the model itself is built without ImageNet weights)."""
    import copy

    from cellmask.config import save_config
    from cellmask.engine import save_checkpoint

    model = build(cfg, seed) if model is None else model
    cfg = copy.deepcopy(cfg)
    cfg["model"]["backbone"]["pretrained"] = pretrained
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    save_checkpoint({"model": model.state_dict(), "config": cfg, "epoch": 1}, out / checkpoint)
    return out


def block_network(monkeypatch) -> None:
    """Make opening any socket (or resolving a name) an error for the rest of the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("inference tried to open a network connection")

    for name in ("socket", "create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)


def branch_config(name: str, weight: float | None = None, detections: int = 10) -> dict:
    """A smoke branch run's config that keeps at most ``detections`` boxes per image (fast tests)."""
    cfg = run_config(name, weight)
    cfg["model"]["roi"]["detections_per_img"] = detections
    return cfg


def silence_detector(model: torch.nn.Module) -> torch.nn.Module:
    """Make a smoke Faster R-CNN find nothing: its classifier always says background."""
    with torch.no_grad():
        bias = model.roi_heads.box_predictor.cls_score.bias
        bias.zero_()
        bias[0] = 50.0
    return model


# ------------------------------------------------------------------ hand-made models


class BlobDetector(torch.nn.Module):
    """Detects the blobs of an image by its content, so that it behaves the same on a flipped
    copy: each connected component brighter than ``bright`` is a box of score ``hi``, each one
    between ``dim`` and ``bright`` a box of score ``lo``; boxes are the components' pixel-edge
    bounding boxes grown by ``pad`` pixels (clipped to the image). Label: ``label``."""

    def __init__(self, hi=0.8, lo=0.45, bright=0.7, dim=0.3, pad=0, label=1) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.hi, self.lo, self.bright, self.dim, self.pad, self.label = hi, lo, bright, dim, pad, label

    def forward(self, images, targets=None):
        import cv2
        import numpy as np

        out = []
        for image in images:
            gray = image[0].detach().cpu().numpy()
            h, w = gray.shape
            boxes, scores = [], []
            for mask, score in (
                (gray > self.bright, self.hi),
                ((gray > self.dim) & (gray <= self.bright), self.lo),
            ):
                n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
                for x, y, bw, bh, _area in stats[1:n]:
                    p = self.pad
                    boxes.append([max(0, x - p), max(0, y - p), min(w, x + bw + p), min(h, y + bh + p)])
                    scores.append(score)
            order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")
            out.append(
                {
                    "boxes": torch.tensor(np.asarray(boxes, np.float32).reshape(-1, 4)[order]),
                    "scores": torch.tensor(np.asarray(scores, np.float32)[order]),
                    "labels": torch.full((len(scores),), self.label, dtype=torch.int64),
                }
            )
        return out


class ContentSegmenter(torch.nn.Module):
    """A segmenter whose probability is ``inside`` on object pixels (brighter than ``dim``) and
    ``outside`` elsewhere: a box grown around a cell gets a halo of ``outside`` probability."""

    def __init__(self, inside=0.8, outside=0.55, dim=0.3, crop_size=32, threshold=0.5) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.inside, self.outside, self.dim = inside, outside, dim
        self.crop_size, self.threshold, self.calls = crop_size, threshold, 0

    def predict_probs(self, images, rois, batch_size=None, amp=False):
        from cellmask.data.crops import crop_rois

        self.calls += len(rois)
        probs = torch.where(images[:, :1] > self.dim, self.inside, self.outside).float()
        return crop_rois(probs, rois, self.crop_size, 2)
