"""The teacher as an exponential moving average (EMA) of the student.

After every optimiser step ``t`` (0-based, the engine's ``on_optimizer_step(iteration)``)::

    m_t = min(momentum, 1 - (1 + warmup) / (t + 2 + warmup))
    teacher = m_t * teacher + (1 - m_t) * student         (parameters and float buffers)

The ramp is the reference's ``MeanTeacher`` hook (its update before iteration ``t + 1`` is this
one after step ``t``): with ``warmup = 0`` the teacher is the mean of the student's first
iterates (``m = 1/2, 2/3, 3/4, ...``) until ``m`` reaches ``momentum`` (0.999 after ~1000 steps),
so a teacher that starts from the same weights follows the student quickly at first and is a
slow average afterwards. ``m_t`` is a function of ``t`` only, so a resumed run continues exactly.
Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_momentum", "ema_update"]


def ema_momentum(iteration: int, momentum: float, warmup: float = 0.0) -> float:
    """The momentum used after optimiser step ``iteration`` (0-based); see the module doc."""
    ramp = 1.0 - (1.0 + warmup) / (iteration + 2.0 + warmup)
    return max(0.0, min(float(momentum), ramp))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, tensor by tensor.

    Both modules must have the same ``state_dict`` keys and shapes (the teacher is a copy of the
    student). Works in the teacher's dtype; parameters with ``requires_grad=False`` (frozen
    stages) average too, which keeps them equal when they are equal.

    Raises:
        ValueError: the two state_dicts differ in keys.
    """
    t_state = teacher.state_dict(keep_vars=True)
    s_state = student.state_dict(keep_vars=True)
    if t_state.keys() != s_state.keys():
        missing = sorted(set(s_state) ^ set(t_state))[:5]
        raise ValueError(f"teacher and student differ in their tensors (e.g. {missing})")
    for key, t in t_state.items():
        s = s_state[key].detach()
        if t.dtype.is_floating_point:
            t.data.mul_(momentum).add_(s.to(t.dtype), alpha=1.0 - momentum)
        else:
            t.data.copy_(s)
