"""The model's numbers of the ``semi:`` section (the data's are in ``cellmask.data.semi``).

::

    semi:
      ema: {momentum: 0.999, warmup: 0}   # teacher = EMA of the student, ramped (see ema.py)
      pseudo:
        score_thresh: 0.9        # teacher score >= this: RPN + classification pseudo-label
        reg_score_thresh: 0.5    # candidates of the box-regression filter (the reference's
                                 # pseudo_label_initial_score_thr)
        max_uncertainty: 0.02    # keep a regression pseudo-box when its jitter std / box size < this
        min_size: 2.0            # drop pseudo-boxes thinner than this (pixels of the student view)
      jitter: {times: 10, scale: 0.06, chunk: 4096}   # copies per box, offset std / box size,
                                                      # RoIs per teacher box-head call
      unsup_weight: 4.0          # total = supervised + unsup_weight x unsupervised
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cellmask.config import deep_merge

__all__ = ["DEFAULT_SEMI_MODEL", "SoftTeacherSettings"]

DEFAULT_SEMI_MODEL: dict[str, Any] = {
    "ema": {"momentum": 0.999, "warmup": 0},
    "pseudo": {"score_thresh": 0.9, "reg_score_thresh": 0.5, "max_uncertainty": 0.02, "min_size": 2.0},
    "jitter": {"times": 10, "scale": 0.06, "chunk": 4096},
    "unsup_weight": 4.0,
}
"""Soft Teacher's numbers (the reference's ``train_cfg`` and ``MeanTeacher`` hook)."""


@dataclass(frozen=True)
class SoftTeacherSettings:
    """Soft Teacher's numbers, validated (see the module doc for their meaning)."""

    ema_momentum: float = 0.999
    ema_warmup: float = 0.0
    score_thresh: float = 0.9
    reg_score_thresh: float = 0.5
    max_uncertainty: float = 0.02
    min_size: float = 2.0
    jitter_times: int = 10
    jitter_scale: float = 0.06
    jitter_chunk: int = 4096
    unsup_weight: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"semi.ema.momentum must be in [0, 1], got {self.ema_momentum}")
        if self.ema_warmup < 0:
            raise ValueError(f"semi.ema.warmup must be >= 0, got {self.ema_warmup}")
        if self.jitter_times < 2:
            raise ValueError(
                f"semi.jitter.times must be >= 2 (a standard deviation), got {self.jitter_times}"
            )
        if self.jitter_chunk < 1:
            raise ValueError(f"semi.jitter.chunk must be >= 1, got {self.jitter_chunk}")
        for name in ("score_thresh", "reg_score_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"semi.pseudo.{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def candidate_thresh(self) -> float:
        """The lowest score any pseudo-label needs: teacher detections below it are dropped."""
        return min(self.score_thresh, self.reg_score_thresh)

    @classmethod
    def from_config(cls, semi_cfg: Mapping[str, Any] | None) -> SoftTeacherSettings:
        """From a ``semi:`` section (its data keys are ignored; unknown keys in the model's
        sub-sections raise ``ValueError``)."""
        given = {k: v for k, v in (semi_cfg or {}).items() if k in DEFAULT_SEMI_MODEL}
        cfg = deep_merge(DEFAULT_SEMI_MODEL, given)
        for key in ("ema", "pseudo", "jitter"):
            unknown = sorted(set(cfg[key]) - set(DEFAULT_SEMI_MODEL[key]))
            if unknown:
                raise ValueError(
                    f"semi.{key}: unknown key(s) {unknown}; expected {sorted(DEFAULT_SEMI_MODEL[key])}"
                )
        ema, pseudo, jitter = cfg["ema"], cfg["pseudo"], cfg["jitter"]
        return cls(
            ema_momentum=float(ema["momentum"]),
            ema_warmup=float(ema["warmup"]),
            score_thresh=float(pseudo["score_thresh"]),
            reg_score_thresh=float(pseudo["reg_score_thresh"]),
            max_uncertainty=float(pseudo["max_uncertainty"]),
            min_size=float(pseudo["min_size"]),
            jitter_times=int(jitter["times"]),
            jitter_scale=float(jitter["scale"]),
            jitter_chunk=int(jitter["chunk"]),
            unsup_weight=float(cfg["unsup_weight"]),
        )
