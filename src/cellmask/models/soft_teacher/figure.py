"""The teacher's pseudo-boxes on a few unlabeled images, as one PNG (written at each validation).

Green: detections that become pseudo-labels (``score >= score_thresh``); red: candidates the
score filter drops (``candidate_thresh <= score < score_thresh``). A dashed outline marks a box
the jitter-uncertainty filter drops from the regression targets (unstable localisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cellmask.data.datasets import image_to_tensor
from cellmask.data.semi import transform_boxes

__all__ = ["PseudoBoxes", "pseudo_boxes", "save_pseudo_box_figure"]

KEPT_COLOR = "#2ecc40"
FILTERED_COLOR = "#ff4136"


PseudoBoxes = dict[str, np.ndarray]
"""Per image: ``boxes`` float32 ``[K, 4]`` xyxy (input pixels), ``scores`` ``[K]``, ``kept`` bool
``[K]`` (passes the score filter), ``stable`` bool ``[K]`` (a regression pseudo-label: candidate
score and uncertainty below the bar)."""


@torch.no_grad()
def pseudo_boxes(
    model, images: Sequence[np.ndarray], device: torch.device | str = "cpu"
) -> list[PseudoBoxes]:
    """The teacher's candidate boxes on ``images`` (uint8 ``[H, W]``, no augmentation) with the
    decisions of both pseudo-label filters. ``model`` is a :class:`~.model.SoftTeacher`."""
    s = model.settings
    tensors = [image_to_tensor(img).to(device) for img in images]
    tp, uncertainty = model.teacher_pseudo_labels(tensors)
    back = torch.linalg.inv(tp.to_internal)
    out = []
    for i, image in enumerate(images):
        boxes = transform_boxes(tp.boxes[i], back[i], clip_to=image.shape[:2])
        scores = tp.scores[i]
        stable = (scores >= s.reg_score_thresh) & (uncertainty[i] < s.max_uncertainty)
        out.append(
            {
                "boxes": boxes.cpu().numpy(),
                "scores": scores.cpu().numpy(),
                "kept": (scores >= s.score_thresh).cpu().numpy(),
                "stable": stable.cpu().numpy(),
            }
        )
    return out


def save_pseudo_box_figure(
    path: str | Path,
    images: Sequence[np.ndarray],
    boxes: Sequence[PseudoBoxes],
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Draw ``boxes`` (from :func:`pseudo_boxes`) on the gray ``images`` side by side; a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(len(images), 1)
    h, w = np.asarray(images[0]).shape[:2] if images else (1, 1)
    fig = Figure(figsize=(4.5 * n, 4.5 * h / w + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (image, pb) in enumerate(zip(images, boxes, strict=True)):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        for box, kept, stable in zip(pb["boxes"], pb["kept"], pb["stable"], strict=True):
            ax.add_patch(
                Rectangle(
                    (box[0], box[1]),
                    box[2] - box[0],
                    box[3] - box[1],
                    fill=False,
                    lw=1.0,
                    edgecolor=KEPT_COLOR if kept else FILTERED_COLOR,
                    linestyle="-" if stable else (0, (2, 2)),
                )
            )
        label = names[i] if names else f"image {i}"
        ax.set_title(
            f"{label}: {int(pb['kept'].sum())} kept, {int((~pb['kept']).sum())} filtered", fontsize=8
        )
        ax.set_axis_off()
    fig.suptitle(
        (title + "\n" if title else "")
        + "teacher pseudo-boxes: green kept, red filtered by score; dashed: unstable (no regression target)",
        fontsize=9,
    )
    fig.savefig(path, dpi=100)
    return path
