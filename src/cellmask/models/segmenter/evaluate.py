"""Validation of the segmentation module: mean mask IoU of every instance segmented from its
truth box (what ``cellmask train`` logs as ``val_mIoU`` for the segmenter)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cellmask.models.paste import PastedMasks

__all__ = ["evaluate_segmenter", "instance_ious"]


def instance_ious(pasted: PastedMasks, truth: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """float64 ``[K]``: IoU of pasted mask ``i`` with truth instance ``i``, given as its
    ``(rows, cols)`` int pixel arrays (1.0 where both are empty)."""
    out = np.zeros(len(truth), dtype=np.float64)
    offsets = pasted.offsets.cpu().numpy()
    for i, (ys, xs) in enumerate(truth):
        win = pasted.windows[i].cpu().numpy()
        y0, x0 = offsets[i]
        ly, lx = ys - y0, xs - x0
        inside = (ly >= 0) & (lx >= 0) & (ly < win.shape[0]) & (lx < win.shape[1])
        inter = int(win[ly[inside], lx[inside]].sum())
        union = int(win.sum()) + len(ys) - inter
        out[i] = inter / union if union else 1.0
    return out


def evaluate_segmenter(
    model: Any,
    records: Sequence[Any],
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    max_images: int | None = None,
    amp: Any = False,
) -> dict[str, float]:
    """Mean mask IoU given the truth boxes: each instance's mask is predicted from its tight box
    (:meth:`~cellmask.models.segmenter.Segmenter.predict`), pasted, and compared with its truth mask.

    Args:
        model: a :class:`~cellmask.models.segmenter.Segmenter` (moved to ``device`` if given).
        records: annotated image records; the first ``max_images`` (all if None) are evaluated.
        batch_size: crops per forward pass (default: the model's).
        amp: autocast the forward on CUDA (``True``, or the dtype: :meth:`predict_probs`).

    Returns:
        ``{"mIoU": mean over instances, "mIoU_image": mean over images of the per-image mean,
        "instances": instances evaluated, "images": images evaluated}``. Images without any
        instance are skipped (not counted in ``images``); the means are NaN when nothing was
        evaluated. The counts let sharded validations merge exactly: ``mIoU`` weighted by
        ``instances``, ``mIoU_image`` by ``images``.
    """
    from cellmask.data.crops import instance_pixels, tight_boxes
    from cellmask.data.images import read_image

    if device is not None:
        model.to(device)
    records = list(records)[: max_images if max_images else None]
    all_ious: list[np.ndarray] = []
    for record in records:
        pixels = [instance_pixels(record, i) for i in range(len(record))]
        pixels = [p for p in pixels if len(p[0])]
        if not pixels:
            continue
        image = torch.from_numpy(read_image(record.path, (record.height, record.width)))
        pasted, _ = model.predict(image, tight_boxes(pixels), batch_size=batch_size, dense=False, amp=amp)
        all_ious.append(instance_ious(pasted, pixels))
    instances = sum(len(a) for a in all_ious)
    return {
        "mIoU": float(np.concatenate(all_ious).mean()) if instances else math.nan,
        "mIoU_image": float(np.mean([a.mean() for a in all_ious])) if all_ious else math.nan,
        "instances": instances,
        "images": len(all_ious),
    }
