"""Soft Teacher, branch 4: a semi-supervised Faster R-CNN (student + EMA teacher).

- :mod:`.model`: :class:`SoftTeacher` (training step, EMA hook, init mapping, inference model)
  and :func:`build_soft_teacher` (registered as ``model.type: soft_teacher``);
- :mod:`.pseudo`: the teacher's detections, pseudo-label selection, box-jitter uncertainty;
- :mod:`.losses`: the background-weighted classification and the regression losses;
- :mod:`.ema`: the EMA update and its momentum ramp;
- :mod:`.settings`: the ``semi:`` numbers the model reads;
- :mod:`.figure`: the teacher's pseudo-boxes drawn on unlabeled images.

The weak/strong views and the labeled + unlabeled batches are in :mod:`cellmask.data.semi`;
training is wired in :mod:`cellmask.training.soft_teacher`.
"""

from cellmask.models.soft_teacher.model import SoftTeacher, build_soft_teacher
from cellmask.models.soft_teacher.settings import DEFAULT_SEMI_MODEL, SoftTeacherSettings

__all__ = ["DEFAULT_SEMI_MODEL", "SoftTeacher", "SoftTeacherSettings", "build_soft_teacher"]
