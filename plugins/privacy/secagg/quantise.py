"""Updates as integers in Z_(2^32), so masks can hide them and sums stay exact.

Each element is clipped to [-clip, clip] and mapped onto ``levels`` steps with
stochastic rounding (unbiased: the expected integer is the exact value). The
levels are chosen so that the sum of ``clients`` inputs never wraps past 2^32:
the sum taken modulo 2^32 is the true sum, and its mean is exact to one step of
2 clip / levels per client.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from elastic_plugins.privacy.secagg.keys import keystream

__all__ = ["levels_for", "quantise", "dequantise_sum", "mean_change"]

MODULUS_BITS = 32
BLOCK = 1 << 16  # elements quantised at a time: the working copy stays in cache


def levels_for(clients: int) -> int:
    """Steps per element such that ``clients`` inputs sum below 2^32."""
    return (1 << (MODULUS_BITS - max(1, math.ceil(math.log2(clients + 1))))) - 1


def quantise(
    x: torch.Tensor | Iterable[torch.Tensor],
    clip: float,
    levels: int,
    seed: bytes,
    masks: Sequence[tuple[bytes, int]] = (),
) -> np.ndarray:
    """``x`` (a tensor, or tensors taken one after another as one vector) as uint32 in
    [0, levels]: clipped, scaled, stochastically rounded with uniform draws from
    ChaCha20 keyed by ``seed`` (32 random bytes); plus ``masks`` in Z_(2^32)
    (``keys.add_masks``'), added to each block while it is in cache. One pass over
    the input and one over the output; the float64 working copy is one block."""
    tensors = [x] if isinstance(x, torch.Tensor) else list(x)
    size = sum(t.numel() for t in tensors)
    out = np.empty(size, dtype=np.uint32)
    scale = levels / (2 * clip)
    draws = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    streams = [(keystream(s), sign) for s, sign in masks]
    zeros = memoryview(bytes(4 * BLOCK))
    work, uniform = np.empty(BLOCK), np.empty(BLOCK)
    block = bytearray(4 * BLOCK)
    at = 0
    for t in tensors:
        flat = t.detach().reshape(-1).to(torch.float32).cpu().numpy()
        for start in range(0, flat.size, BLOCK):
            n = min(BLOCK, flat.size - start)
            v, u, target = work[:n], uniform[:n], out[at : at + n]
            np.clip(flat[start : start + n], -clip, clip, out=v)
            v += clip
            v *= scale
            np.multiply(
                np.frombuffer(draws.update(zeros[: 4 * n]), dtype=np.uint32), 2.0**-32, out=u
            )
            v += u  # rounds up with the odds of the fractional part
            np.floor(v, out=v)
            np.minimum(v, levels, out=v)
            target[:] = v
            for encryptor, sign in streams:
                encryptor.update_into(zeros[: 4 * n], block)
                stream = np.frombuffer(block, dtype=np.uint32, count=n)
                (np.add if sign > 0 else np.subtract)(target, stream, out=target)
            at += n
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
