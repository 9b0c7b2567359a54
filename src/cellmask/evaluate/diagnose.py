"""Per cell type, what the ensemble finds before any threshold and what picks the thresholds.

The competition metric never looks at a cell's class; the class only picks the score threshold
and the minimum area each box is held to. So a cell type can score low for two different
reasons, which :func:`diagnose` tells apart on annotated images:

- **the boxes are not there**: box recall at IoU 0.5 of the fused detections (every box WBF
  keeps, whatever its score), per cell type and truth size (mask area, :data:`SIZE_BINS`);
- **they are there but cut at another type's threshold**: the image type the pipeline decides
  (the class vote, or the per-box classes pooled the same way when the vote is off) against the
  true type, a confusion matrix.

An oracle row (:data:`ORACLE_ROW`: every box of an image given its true type, so its true type's
threshold and minimum area apply) says what a right decision would be worth. It uses the truth:
it is a diagnosis, never a figure to claim.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ORACLE_ROW", "SIZE_BINS", "Diagnosis", "decided_type", "diagnose", "size_bin"]

SIZE_BINS: tuple[int, ...] = (0, 150, 400, 1000)
"""Lower edges of the truth-size bins (mask area, pixels): under 150 (a small shsy5y or cort
cell), 150-400, 400-1000, 1000 and over (astrocytes)."""
ORACLE_ROW = "oracle: each image's true type picks its thresholds (diagnosis only)"


def size_bin(area: float) -> str:
    """``"<150"``, ``"150-400"``, ``"400-1000"`` or ``">=1000"``."""
    edges = SIZE_BINS
    for lo, hi in itertools.pairwise(edges):
        if area < hi:
            return f"<{hi}" if lo == 0 else f"{lo}-{hi}"
    return f">={edges[-1]}"


@dataclass
class Diagnosis:
    """What :func:`diagnose` measured.

    Attributes:
        recall: ``{type: {size bin: [found, truths]}}`` at IoU 0.5, before any threshold.
        confusion: per decider (``"class vote"``, and ``"image-type classifier"`` when the
            pipeline names one), ``{true type: {decided type: images}}`` (``"none"``: no
            detection at all).
        decided_by: the decider the pipeline as configured uses.
        iou: the IoU of a found box.
    """

    recall: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    confusion: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    decided_by: str = "class vote"
    iou: float = 0.5

    def type_accuracy(self, decider: str | None = None) -> dict[str, float]:
        """Per true type (and ``all``): the fraction of its images ``decider`` (default: the
        configured one) gives the right type."""
        confusion = self.confusion.get(decider or self.decided_by, {})
        out = {}
        for true, row in confusion.items():
            total = sum(row.values())
            out[true] = row.get(true, 0) / total if total else float("nan")
        right = sum(row.get(t, 0) for t, row in confusion.items())
        total = sum(sum(row.values()) for row in confusion.values())
        out["all"] = right / total if total else float("nan")
        return out

    def recall_of(self, cell_type: str) -> float:
        """Box recall of one type over every size."""
        found = sum(v[0] for v in self.recall.get(cell_type, {}).values())
        total = sum(v[1] for v in self.recall.get(cell_type, {}).values())
        return found / total if total else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "iou": self.iou,
            "decided_by": self.decided_by,
            "recall": self.recall,
            "recall_per_type": {t: self.recall_of(t) for t in self.recall},
            "confusion": self.confusion,
            "type_accuracy": {d: self.type_accuracy(d) for d in self.confusion},
        }


def decided_type(dets: Any, opts: Mapping[str, Any]) -> int | None:
    """The type the pipeline's thresholds follow for an image: the class vote's, or with the vote
    off the per-box classes pooled by the same score-weighted vote (what most boxes are held to)."""
    from cellmask.predict.pipeline import image_class

    return image_class(dets.labels, dets.scores, float(opts["vote_min_score"])) if len(dets) else None


def _found(truth: np.ndarray, boxes: np.ndarray, iou: float, chunk: int = 512) -> np.ndarray:
    """bool ``[G]``: each truth box has a detection with box IoU >= ``iou`` (truths in chunks)."""
    import torch
    from torchvision.ops import box_iou

    found = np.zeros(len(truth), dtype=bool)
    if not len(truth) or not len(boxes):
        return found
    dets = torch.as_tensor(boxes, dtype=torch.float32)
    for start in range(0, len(truth), chunk):
        part = torch.as_tensor(truth[start : start + chunk], dtype=torch.float32)
        found[start : start + len(part)] = (box_iou(part, dets).amax(dim=1) >= iou).numpy()
    return found


def diagnose(
    predictor: Any,
    records: Sequence[Any],
    iou: float = 0.5,
    progress: bool = True,
) -> Diagnosis:
    """Box recall by truth size and the image-type decision, per cell type, of ``predictor``'s
    pipeline as configured on annotated ``records`` (module docstring). Detections come from the
    predictor's detection cache when it has one.
    """
    from cellmask.data.classes import CLASSES
    from cellmask.data.rle import rle_area

    opts = predictor.options
    classifier = bool(opts["class_vote"] and opts.get("type_classifier"))
    decided_by = "image-type classifier" if classifier else "class vote"
    if not opts["class_vote"]:
        decided_by = "per-box classes (pooled)"
    out = Diagnosis(decided_by=decided_by, iou=iou)
    vote_name = "class vote" if opts["class_vote"] else decided_by
    for record, array, tensor, raw in predictor.iter_records(records, progress, "diagnose"):
        dets = predictor.fuse(raw, tuple(array.shape))
        truth = np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4)
        found = _found(truth, dets.boxes, iou)
        bins = out.recall.setdefault(record.cell_type, {})
        for hit, rle in zip(found, record.rles(), strict=True):
            entry = bins.setdefault(size_bin(rle_area(rle, record.height, record.width)), [0, 0])
            entry[0] += int(hit)
            entry[1] += 1
        deciders = {vote_name: decided_type(dets, opts)}
        if classifier:
            deciders["image-type classifier"] = predictor.image_type(tensor, opts)
        for name, label in deciders.items():
            decided = CLASSES[label - 1] if label else "none"
            row = out.confusion.setdefault(name, {}).setdefault(record.cell_type, {})
            row[decided] = row.get(decided, 0) + 1
    return out
