"""What the notebooks show: the validation images of a run, an instance table, detections and
truth-box segmentations of a checkpoint, and their figures. Model code stays in the rest of
cellmask; these run on CUDA when present (``device=None``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def default_device(device: str | None = None) -> str:
    """``device``, or ``cuda`` when a GPU is present, else ``cpu`` (a notebook's ``DEVICE = None``)."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def validation_records(run_dir: str | Path, data: str | Path) -> list[Any]:
    """The validation images of a run: the split its own ``config.yaml`` made of ``data``."""
    import yaml

    from cellmask.training.split import load_split

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    dataset = (cfg.get("data") or {}).get("dataset", "sartorius")
    return load_split(cfg, data, dataset)[1]


def instance_table(records: Sequence[Any]) -> Any:
    """A pandas DataFrame with one row per instance: ``image_id``, ``cell_type``, ``area``
    (pixels), ``box_w``, ``box_h``."""
    import numpy as np
    import pandas as pd

    from cellmask.data.rle import rle_area

    rows = []
    for r in records:
        boxes = np.asarray(r.boxes, dtype=float).reshape(-1, 4)
        for i, rle in enumerate(r.rles()):
            x0, y0, x1, y1 = boxes[i]
            rows.append((r.image_id, r.cell_type, rle_area(rle, r.height, r.width), x1 - x0, y1 - y0))
    return pd.DataFrame(rows, columns=["image_id", "cell_type", "area", "box_w", "box_h"])


def detect_records(checkpoint: str | Path, records: Sequence[Any], device: str | None = None) -> list[dict]:
    """Raw detections ``{"boxes", "scores", "labels"}`` (numpy) of a detector checkpoint on
    every record's image."""
    from cellmask.data.images import read_image
    from cellmask.predict import detect, load_detector

    model, _ = load_detector(checkpoint, default_device(device))
    out = []
    for r in records:
        boxes, scores, labels = detect(model, read_image(r.path, (r.height, r.width)))
        out.append({"boxes": boxes.numpy(), "scores": scores.numpy(), "labels": labels.numpy()})
    return out


def plot_detections(
    records: Sequence[Any], detections: Sequence[Mapping[str, Any]], min_score: float = 0.5
) -> Any:
    """One panel per record: truth boxes (green) and detections scoring >= ``min_score`` (red)."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from cellmask.data.images import read_image

    fig = Figure(figsize=(5 * len(records), 4), layout="constrained")
    for i, (r, det) in enumerate(zip(records, detections, strict=True)):
        ax = fig.add_subplot(1, len(records), i + 1)
        ax.imshow(read_image(r.path, (r.height, r.width)), cmap="gray")
        keep = np.asarray(det["scores"]) >= min_score
        for boxes, color in ((np.asarray(r.boxes), "lime"), (np.asarray(det["boxes"])[keep], "red")):
            for x0, y0, x1, y1 in boxes.reshape(-1, 4):
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=color, lw=0.8))
        ax.set_title(f"{r.image_id} ({r.cell_type}): {len(r)} truth, {int(keep.sum())} detected", fontsize=9)
        ax.set_axis_off()
    return fig


def plot_bars(table: Mapping[str, Mapping[str, float]], ylabel: str, title: str = "") -> Any:
    """Grouped bars: one group per inner key (e.g. class), one bar per outer key (e.g. model),
    each labelled with its value (``n/a`` for NaN, e.g. a class without validation images)."""
    import numpy as np
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys(k for row in table.values() for k in row))
    fig = Figure(figsize=(max(4.0, 1.5 * len(groups) + 2), 3.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(table))
    for j, (name, row) in enumerate(table.items()):
        xs = np.arange(len(groups)) + j * width
        values = [float(row.get(g, np.nan)) for g in groups]
        bars = ax.bar(xs, np.nan_to_num(values), width=width, label=name)
        ax.bar_label(bars, labels=["n/a" if np.isnan(v) else f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks(np.arange(len(groups)) + width * (len(table) - 1) / 2, groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def segment_truth_boxes(
    checkpoint: str | Path, records: Sequence[Any], device: str | None = None
) -> dict[str, list[str]]:
    """``{image_id: [rle, ...]}``: the segmenter checkpoint's mask of every truth box of each
    record (what its validation mIoU measures), for :func:`cellmask.demo.save_comparison`."""
    from cellmask.data.images import read_image
    from cellmask.data.rle import rle_encode
    from cellmask.predict import load_segmenter, segment

    model, _ = load_segmenter(checkpoint, default_device(device))
    out = {}
    for r in records:
        pasted, _ = segment(model, read_image(r.path, (r.height, r.width)), r.boxes)
        out[r.image_id] = [rle_encode(pasted.mask(i).numpy()) for i in range(len(pasted))]
    return out
