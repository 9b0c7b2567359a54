"""Mixed precision by hardware: one autocast dtype for training, validation and inference.

``train.amp_dtype: auto`` (the default) picks bfloat16 where the GPU supports it (Ampere and
newer: A100, L4, H100) and float16 where it does not (T4, P100), where a ``GradScaler`` then
keeps small gradients from underflowing; bfloat16 needs none (float32's exponent range).
``float16`` / ``bfloat16`` force one. On the CPU autocast is off: CPU training and the tests run
in float32.
"""

from __future__ import annotations

import torch

AMP_DTYPES = ("auto", "float16", "bfloat16")


def amp_dtype(name: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """The autocast dtype of ``name`` (:data:`AMP_DTYPES`; ``None`` is ``auto``) on ``device``.

    Raises:
        ValueError: an unknown name.
    """
    if isinstance(name, torch.dtype):
        return name
    name = "auto" if name is None else str(name)
    if name not in AMP_DTYPES:
        raise ValueError(f"train.amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {name!r}")
    if name != "auto":
        return getattr(torch, name)
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def needs_scaler(enabled: bool, dtype: torch.dtype, device: str | torch.device) -> bool:
    """Whether a ``GradScaler`` is needed: autocast on, on CUDA, in float16."""
    return bool(enabled) and torch.device(device).type == "cuda" and dtype == torch.float16


def tune_backends(device: str | torch.device, fixed_size: bool) -> None:
    """``cudnn.benchmark`` on CUDA when every input has one size (convolution algorithms are
    then chosen once); off otherwise (each new size would be benchmarked again)."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = bool(fixed_size)
