"""``[train] precision``: the forward pass under torch's autocast (bf16 or fp16), and
fp16's gradient scaler on CUDA; the weights, and so the updates, stay fp32."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["autocast", "grad_scaler"]

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's context for ``precision`` on ``device``: torch's autocast
    to bf16 or fp16, or nothing for fp32."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 on CUDA scales the loss, so that small gradients do not flush to zero."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None
