"""Soft Teacher (Xu et al., ICCV 2021): a student Faster R-CNN trained on labeled images and on
the teacher's pseudo-labels of unlabeled images; the teacher is an EMA of the student.

One training step (:meth:`SoftTeacher.training_step`) on a batch of
:func:`cellmask.data.semi.collate_semi`:

1. supervised: the student's ordinary Faster R-CNN losses on the labeled images;
2. teacher (no gradients, eval mode) on the weak views: detections scoring at least
   ``min(score_thresh, reg_score_thresh)`` and their box-jitter uncertainty
   (:func:`~cellmask.models.soft_teacher.pseudo.jitter_uncertainty`);
3. the detections are mapped onto the student's strong view (``A_strong @ inv(A_weak)`` plus
   both models' resize ratios), clipped, and boxes thinner than ``min_size`` are dropped;
4. unsupervised, on the strong views: the RPN trains on the pseudo-boxes with
   ``score >= score_thresh``; the R-CNN classification samples proposals against the same
   pseudo-boxes and weights each background proposal by the teacher's background probability
   of it (the proposal mapped back into the teacher's frame, scored by the teacher's box head);
   the R-CNN box regression samples proposals against the pseudo-boxes with
   ``score >= reg_score_thresh`` and uncertainty ``< max_uncertainty``;
5. total = supervised + ``unsup_weight`` x unsupervised.

Returned dict (contract 1): ``loss_sup_<term>`` and ``loss_unsup_<term>`` (the latter already
multiplied by ``unsup_weight``) for the terms ``objectness``, ``rpn_box_reg``, ``classifier``,
``box_reg``; and the statistics ``sup_loss``, ``unsup_loss`` (unweighted), ``pseudo_boxes_per_image``,
``reg_boxes_per_image``, ``uncertainty_kept_fraction`` (regression pseudo-boxes / candidates, 0
when there is no candidate) and ``background_weight`` (mean teacher background probability of
the background proposals).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from cellmask.data.semi import relative_matrix, transform_boxes
from cellmask.models.soft_teacher.ema import ema_momentum, ema_update
from cellmask.models.soft_teacher.losses import (
    background_weights,
    box_regression_loss,
    weighted_classification_loss,
)
from cellmask.models.soft_teacher.pseudo import (
    TeacherPass,
    box_head_outputs,
    class_probabilities,
    jitter_uncertainty,
    refine_boxes,
    resize_matrices,
    select_pseudo_labels,
    teacher_pass,
)
from cellmask.models.soft_teacher.settings import SoftTeacherSettings

__all__ = ["SoftTeacher", "build_soft_teacher"]

_PREFIXES = ("student", "teacher")


def _renamed(losses: Mapping[str, Tensor], stream: str, weight: float = 1.0) -> dict[str, Tensor]:
    """``loss_x`` -> ``loss_<stream>_x`` (times ``weight``)."""
    return {f"loss_{stream}_{k.removeprefix('loss_')}": v * weight for k, v in losses.items()}


class SoftTeacher(nn.Module):
    """Student + EMA teacher, two torchvision-style Faster R-CNNs of identical structure.

    Args:
        student: the trained detector (``CellFasterRCNN``).
        settings: Soft Teacher's numbers.
        teacher: defaults to a deep copy of ``student`` (same weights). It never gets gradients
            (``requires_grad=False``) and stays in eval mode whatever ``train()`` is called with.

    In eval mode ``forward(images)`` is the teacher's (the model that is validated and used for
    inference); in train mode ``forward(images, targets)`` is the student's supervised one.
    """

    def __init__(
        self, student: nn.Module, settings: SoftTeacherSettings, teacher: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher if teacher is not None else copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.settings = settings

    # ---------------------------------------------------------------- engine hooks

    def train(self, mode: bool = True) -> SoftTeacher:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if self.training:
            return self.student(images, targets)
        return self.teacher(images)

    def inference_model(self) -> nn.Module:
        """The teacher: a plain Faster R-CNN (contract 5)."""
        return self.teacher

    def class_dependent_prefixes(self) -> list[str]:
        inner = getattr(self.student, "class_dependent_prefixes", lambda: [])()
        return [f"{name}.{p}" for name in _PREFIXES for p in inner]

    def map_init_state_dict(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A plain Faster R-CNN ``state_dict`` initialises both student and teacher (contract 10);
        one that already has ``student.``/``teacher.`` keys (a Soft Teacher run) is kept as is."""
        if any(k.startswith(tuple(f"{p}." for p in _PREFIXES)) for k in state):
            return dict(state)
        return {f"{p}.{k}": v for p in _PREFIXES for k, v in state.items()}

    def on_optimizer_step(self, iteration: int) -> None:
        """EMA update of the teacher after optimiser step ``iteration`` (contract 2)."""
        s = self.settings
        ema_update(self.teacher, self.student, ema_momentum(iteration, s.ema_momentum, s.ema_warmup))

    # ---------------------------------------------------------------- training

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Losses and statistics of one step (see the module doc); ``batch`` as
        :func:`cellmask.data.semi.collate_semi` makes it, on the model's device.

        Raises:
            TypeError: any other batch (e.g. a plain detector loader's ``(images, targets)``).
        """
        if not isinstance(batch, Mapping) or "labeled" not in batch or "strong" not in batch:
            raise TypeError(
                "SoftTeacher.training_step takes a cellmask.data.semi.collate_semi batch (labeled + "
                f"unlabeled views), got {type(batch).__name__}: build the loader with "
                "cellmask.training.soft_teacher.soft_teacher_parts (model.type soft_teacher)"
            )
        images, targets = batch["labeled"]
        sup = self.student(list(images), list(targets))
        unsup, stats = self.unsupervised_losses(
            list(batch["weak"]), list(batch["strong"]), batch["weak_matrix"], batch["strong_matrix"]
        )
        out = {**_renamed(sup, "sup"), **_renamed(unsup, "unsup", self.settings.unsup_weight)}
        out["sup_loss"] = torch.stack([v.detach().float() for v in sup.values()]).sum()
        out["unsup_loss"] = torch.stack([v.detach().float() for v in unsup.values()]).sum()
        out.update(stats)
        return out

    @torch.no_grad()
    def teacher_pseudo_labels(self, weak: list[Tensor]) -> tuple[TeacherPass, list[Tensor]]:
        """The teacher's candidate detections on the weak views and their jitter uncertainty
        (float32 ``[K_i]``); boxes in the teacher's internal frame (``TeacherPass.to_internal``)."""
        s = self.settings
        tp = teacher_pass(self.teacher, weak, s.candidate_thresh)
        refine = partial(self._teacher_refine, tp)
        uncertainty = jitter_uncertainty(tp.boxes, tp.labels, refine, s.jitter_times, s.jitter_scale)
        return tp, uncertainty

    def _teacher_refine(self, tp: TeacherPass, boxes: list[Tensor], labels: list[Tensor]) -> list[Tensor]:
        return refine_boxes(
            self.teacher, tp.features, boxes, labels, tp.image_sizes, self.settings.jitter_chunk
        )

    def _student_targets(
        self, tp: TeacherPass, uncertainty: list[Tensor], strong: list[Tensor], to_strong: Tensor
    ) -> tuple[list[dict[str, Tensor]], tuple[int, int, int]]:
        """The teacher's candidates mapped onto the strong views (``to_strong``: float64
        ``[B, 3, 3]`` from the teacher's frame), clipped, too-thin boxes dropped, with both
        filters' decisions as ``cls_keep``/``reg_keep`` masks; and the counts (classification
        pseudo-boxes, regression candidates, regression pseudo-boxes) over the batch."""
        s = self.settings
        targets, n_cls, n_cand, n_reg = [], 0, 0, 0
        for i, image in enumerate(strong):
            size = (int(image.shape[-2]), int(image.shape[-1]))
            boxes = transform_boxes(tp.boxes[i], to_strong[i], clip_to=size)
            wh = boxes[:, 2:] - boxes[:, :2]
            valid = (wh >= s.min_size).all(dim=1)
            cls_keep = valid & select_pseudo_labels(tp.scores[i], s.score_thresh)
            candidates = valid & select_pseudo_labels(tp.scores[i], s.reg_score_thresh)
            reg_keep = candidates & (uncertainty[i] < s.max_uncertainty)
            n_cls += int(cls_keep.sum())
            n_cand += int(candidates.sum())
            n_reg += int(reg_keep.sum())
            targets.append(
                {
                    "boxes": boxes[valid],
                    "labels": tp.labels[i][valid],
                    "cls_keep": cls_keep[valid],
                    "reg_keep": reg_keep[valid],
                }
            )
        return targets, (n_cls, n_cand, n_reg)

    def unsupervised_losses(
        self, weak: list[Tensor], strong: list[Tensor], weak_matrix: Tensor, strong_matrix: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Unweighted unsupervised losses (``loss_objectness``, ``loss_rpn_box_reg``,
        ``loss_classifier``, ``loss_box_reg``) and the pseudo-label statistics."""
        s = self.settings
        tp, uncertainty = self.teacher_pseudo_labels(weak)
        device = weak_matrix.device
        with torch.autocast(device_type=device.type, enabled=False):
            to_strong = relative_matrix(weak_matrix, strong_matrix) @ torch.linalg.inv(tp.to_internal)

        targets, counts = self._student_targets(tp, uncertainty, strong, to_strong)

        student = self.student
        original = [(int(img.shape[-2]), int(img.shape[-1])) for img in strong]
        image_list, targets = student.transform(strong, targets)
        sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
        features = student.backbone(image_list.tensors)
        cls_targets = [
            {"boxes": t["boxes"][t["cls_keep"]], "labels": t["labels"][t["cls_keep"]]} for t in targets
        ]
        reg_targets = [
            {"boxes": t["boxes"][t["reg_keep"]], "labels": t["labels"][t["reg_keep"]]} for t in targets
        ]
        proposals, rpn_losses = student.rpn(image_list, features, cls_targets)

        heads = student.roi_heads
        # classification: background proposals weighted by the teacher's background probability
        sampled, _, labels, _ = heads.select_training_samples(proposals, cls_targets)
        logits, _ = box_head_outputs(student, features, sampled, sizes, chunk=1 << 30)
        with torch.autocast(device_type=device.type, enabled=False):
            to_teacher = torch.linalg.inv(to_strong) @ torch.linalg.inv(
                resize_matrices(original, sizes, device)
            )
        in_teacher = [
            transform_boxes(b.detach(), to_teacher[i], clip_to=tp.image_sizes[i])
            for i, b in enumerate(sampled)
        ]
        probs = class_probabilities(self.teacher, tp.features, in_teacher, tp.image_sizes, s.jitter_chunk)
        all_labels = torch.cat(labels)
        weights = background_weights(all_labels, probs[:, 0])
        loss_cls = weighted_classification_loss(logits, all_labels, weights)
        # regression: only the pseudo-boxes whose localisation is stable
        sampled_r, _, labels_r, targets_r = heads.select_training_samples(proposals, reg_targets)
        _, regression = box_head_outputs(student, features, sampled_r, sizes, chunk=1 << 30)
        loss_box = box_regression_loss(regression, torch.cat(labels_r), torch.cat(targets_r))

        losses = {**rpn_losses, "loss_classifier": loss_cls, "loss_box_reg": loss_box}
        n_images = max(len(strong), 1)
        n_cls, n_cand, n_reg = counts
        background = all_labels == 0
        stats = {
            "pseudo_boxes_per_image": torch.tensor(n_cls / n_images, device=device),
            "reg_boxes_per_image": torch.tensor(n_reg / n_images, device=device),
            "uncertainty_kept_fraction": torch.tensor(n_reg / n_cand if n_cand else 0.0, device=device),
            "background_weight": (
                weights[background].mean().detach() if background.any() else torch.zeros((), device=device)
            ),
        }
        return losses, stats


def build_soft_teacher(
    model_cfg: dict[str, Any], num_classes: int, backbone: nn.Module | None = None
) -> SoftTeacher:
    """The registry's builder of ``type: soft_teacher``.

    The student is the Faster R-CNN of the same ``model`` section (``type: faster_rcnn``, built on
    ``backbone`` when given); the teacher a copy of it. Soft Teacher's numbers come from
    ``model_cfg["semi"]`` (the run config's top-level ``semi:`` section, which
    ``cellmask.training.soft_teacher`` passes in; absent: the defaults, which is all inference needs).
    """
    from cellmask.models.faster_rcnn import build_faster_rcnn

    cfg = dict(model_cfg)
    semi = cfg.pop("semi", None)
    cfg["type"] = "faster_rcnn"
    student = build_faster_rcnn(cfg, num_classes, backbone)
    return SoftTeacher(student, SoftTeacherSettings.from_config(semi))
