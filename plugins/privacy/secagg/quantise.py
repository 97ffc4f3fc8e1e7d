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
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["levels_for", "quantise", "dequantise_sum", "mean_change"]

MODULUS_BITS = 32
BLOCK = 1 << 20  # elements quantised at a time


def levels_for(clients: int) -> int:
    """Steps per element such that ``clients`` inputs sum below 2^32."""
    return (1 << (MODULUS_BITS - max(1, math.ceil(math.log2(clients + 1))))) - 1


def quantise(x: torch.Tensor, clip: float, levels: int, seed: bytes) -> np.ndarray:
    """``x`` (float) as uint32 in [0, levels]: clipped, scaled, stochastically rounded
    with uniform draws from ChaCha20 keyed by ``seed`` (32 random bytes), a block at a
    time so the float64 working copy stays small."""
    flat = x.detach().flatten().to(torch.float32).cpu().numpy()
    out = np.empty(flat.size, dtype=np.uint32)
    scale = levels / (2 * clip)
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    zeros = memoryview(bytes(4 * min(BLOCK, flat.size)))
    for start in range(0, flat.size, BLOCK):
        piece = flat[start : start + BLOCK].astype(np.float64)
        np.clip(piece, -clip, clip, out=piece)
        piece += clip
        piece *= scale
        draws = np.frombuffer(stream.update(zeros[: 4 * piece.size]), dtype=np.uint32)
        piece += draws * 2.0**-32  # uniform in [0, 1): rounds up with the fractional part's odds
        np.floor(piece, out=piece)
        np.clip(piece, 0, levels, out=piece)
        out[start : start + piece.size] = piece
    return out


def dequantise_sum(total: np.ndarray, clients: int, clip: float, levels: int) -> torch.Tensor:
    """The sum of ``clients`` quantised inputs (uint32, unwrapped) as floats."""
    return torch.from_numpy(total.astype(np.float64) * (2 * clip / levels) - clients * clip)


def mean_change(total: np.ndarray, clients: int, clip: float, levels: int) -> torch.Tensor:
    """The mean of ``clients`` quantised inputs whose sum is ``total``, in float32,
    a block at a time (the float64 working copy stays small)."""
    out = torch.empty(total.size, dtype=torch.float32)
    target = out.numpy()
    step = 2 * clip / levels
    for start in range(0, total.size, BLOCK):
        piece = total[start : start + BLOCK].astype(np.float64)
        piece *= step
        piece -= clients * clip
        piece /= clients
        target[start : start + piece.size] = piece
    return out
