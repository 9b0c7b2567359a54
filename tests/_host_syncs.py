"""Count the tensor calls that would wait on a GPU (test helper; the tests run on the CPU).

:class:`HostSyncs` is a ``TorchFunctionMode`` that counts every call that copies a tensor to the
host (``.cpu()``, ``.to("cpu")``) or reads a tensor's value on the host (``.item()``,
``.tolist()``, ``int()``/``float()``/``bool()``/``__index__`` of a tensor, ``nonzero`` and
``masked_select`` and boolean-mask indexing, whose output size is a read). ``.numpy()`` is not counted (on a GPU it
needs a ``.cpu()`` first), nor ``.to(device)`` with a ``torch.device`` (the code's way to move
things to the compute device). On the CPU it cannot tell a device tensor from a host one: the
count includes reads of host tensors, and a ``.to("cpu")`` of what is already there copies
nothing, so it is not exactly a GPU's count; what the tests assert is that it does not grow
with the number of boxes.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

_READS = {
    torch.Tensor.cpu,
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.masked_select,
    torch.Tensor.masked_select,
}


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    return any(isinstance(t, str) and t.startswith("cpu") for t in (*args[1:], kwargs.get("device")))


def _bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncs(TorchFunctionMode):
    """``with HostSyncs() as syncs: ...``; then ``syncs.total`` and ``syncs.calls`` (by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if (
            func in _READS
            or (func is torch.Tensor.to and _to_cpu(args, kwargs))
            or (func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _bool_index(args))
        ):
            self.calls[name] += 1
        return func(*args, **kwargs)
