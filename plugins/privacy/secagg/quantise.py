"""Updates as integers in Z_(2^32), so masks can hide them and sums stay exact.

Each element is clipped to [-clip, clip] and mapped onto ``levels`` steps with
stochastic rounding (unbiased: the expected integer is the exact value). The
levels are chosen so that the sum of ``clients`` inputs never wraps past 2^32:
the sum taken modulo 2^32 is the true sum, and its mean is exact to one step of
2 clip / levels per client.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["levels_for", "quantise", "dequantise_sum"]

MODULUS_BITS = 32


def levels_for(clients: int) -> int:
    """Steps per element such that ``clients`` inputs sum below 2^32."""
    return (1 << (MODULUS_BITS - max(1, math.ceil(math.log2(clients + 1))))) - 1


def quantise(x: torch.Tensor, clip: float, levels: int, generator: torch.Generator) -> np.ndarray:
    """``x`` (float) as uint32 in [0, levels]: clipped, scaled, stochastically rounded."""
    scaled = (x.detach().to(torch.float64).flatten().clamp(-clip, clip) + clip) * (
        levels / (2 * clip)
    )
    noise = torch.rand(scaled.shape, dtype=torch.float64, generator=generator)
    return torch.floor(scaled + noise).clamp(0, levels).to(torch.int64).numpy().astype(np.uint32)


def dequantise_sum(total: np.ndarray, clients: int, clip: float, levels: int) -> torch.Tensor:
    """The sum of ``clients`` quantised inputs (uint32, unwrapped) as floats."""
    return torch.from_numpy(total.astype(np.float64) * (2 * clip / levels) - clients * clip)
