"""Soft Teacher's R-CNN losses on the unlabeled images.

- Classification (the *soft teacher*): cross-entropy of the student's sampled proposals, each
  background proposal weighted by the teacher's background probability for it (a proposal the
  teacher is sure is background counts fully; one the teacher thinks may be a cell counts
  little), foreground proposals weight 1, normalised by the sum of the weights over the batch
  (the reference's ``loss_cls.sum() / max(label_weights.sum(), 1)``).
- Box regression: torchvision's Fast R-CNN regression loss (smooth L1, ``beta = 1/9``, summed
  over the positives' class-specific deltas, divided by the number of sampled proposals).

Both are computed in float32 (contract 9).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["background_weights", "box_regression_loss", "weighted_classification_loss"]


def background_weights(labels: Tensor, background_scores: Tensor) -> Tensor:
    """float32 ``[N]``: ``background_scores`` where ``labels == 0`` (background), 1 elsewhere."""
    return torch.where(labels == 0, background_scores.float(), torch.ones_like(background_scores.float()))


def weighted_classification_loss(class_logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """``sum_i w_i CE(logits_i, label_i) / max(sum_i w_i, 1)`` (a 0-d float32 tensor).

    Args:
        class_logits: ``[N, C]`` (any float dtype).
        labels: int64 ``[N]`` (0 = background).
        weights: ``[N]`` (:func:`background_weights`).
    """
    ce = F.cross_entropy(class_logits.float(), labels, reduction="none")
    w = weights.float()
    return (ce * w).sum() / w.sum().clamp(min=1.0)


def box_regression_loss(box_regression: Tensor, labels: Tensor, regression_targets: Tensor) -> Tensor:
    """Smooth-L1 (``beta = 1/9``) of the positives' deltas for their class, summed, over ``N``.

    Args:
        box_regression: ``[N, 4C]`` class-specific deltas.
        labels: int64 ``[N]`` (0 = background).
        regression_targets: ``[N, 4]`` encoded targets.

    Returns:
        a 0-d float32 tensor (0 with the graph kept when nothing is positive).
    """
    n = labels.numel()
    deltas = box_regression.float().reshape(n, -1, 4)
    pos = torch.where(labels > 0)[0]
    picked = deltas[pos, labels[pos]]
    loss = F.smooth_l1_loss(picked, regression_targets[pos].float(), beta=1.0 / 9, reduction="sum")
    return loss / max(n, 1)
