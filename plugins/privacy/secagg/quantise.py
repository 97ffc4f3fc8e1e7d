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
from elastic_plugins.privacy.secagg.keys import keystream

__all__ = ["levels_for", "quantise", "flat_uint32", "dequantise_sum", "mean_change"]

MODULUS_BITS = 32
BLOCK = 1 << 14  # elements quantised at a time: the working copy stays in cache


def levels_for(clients: int) -> int:
    """Steps per element such that ``clients`` inputs sum below 2^32."""
    return (1 << (MODULUS_BITS - max(1, math.ceil(math.log2(clients + 1))))) - 1


def quantise(
    x: torch.Tensor | Iterable[torch.Tensor],
    clip: float,
    levels: int,
    seed: bytes,
    masks: Sequence[tuple[bytes, int]] = (),
    in_place: bool = False,
) -> list[torch.Tensor]:
    """``x`` (a tensor, or tensors taken one after another as one vector) in
    [0, levels], as the bits of uint32 in int32 tensors of the same shapes: clipped,
    scaled, stochastically rounded with uniform draws from ``keystream(seed)`` (32
    random bytes); plus ``masks`` in Z_(2^32) (``keys.add_masks``'), added to each
    block while it is in cache. One pass over the input; the float64 working copy is
    one block.

    ``in_place``: a contiguous float32 CPU tensor is overwritten by its own result
    (the caller gives up the values). A worker's change is as big as the model, and
    a fresh buffer that size costs a page fault every 4 KiB: with many clients to a
    machine, more than the masking itself."""
    tensors = [x] if isinstance(x, torch.Tensor) else list(x)
    scale = levels / (2 * clip)
    draws = keystream(seed)
    streams = [(keystream(s), sign) for s, sign in masks]
    zeros = memoryview(bytes(4 * BLOCK))
    work, uniform = np.empty(BLOCK), np.empty(BLOCK)
    drawn, block = bytearray(4 * BLOCK), bytearray(4 * BLOCK)
    drawn_u32, block_u32 = np.frombuffer(drawn, np.uint32), np.frombuffer(block, np.uint32)
    outputs = []
    for t in tensors:
        t = t.detach()
        own = in_place and t.dtype == torch.float32 and t.device.type == "cpu"
        own = own and t.is_contiguous()
        result = t.view(torch.int32) if own else torch.empty(t.shape, dtype=torch.int32)
        flat = t.reshape(-1).to(torch.float32).cpu().numpy()
        out = result.reshape(-1).numpy().view(np.uint32)  # (the same memory as flat if own)
        for start in range(0, flat.size, BLOCK):
            n = min(BLOCK, flat.size - start)
            v, u, target = work[:n], uniform[:n], out[start : start + n]
            np.clip(flat[start : start + n], -clip, clip, out=v)  # (read before written)
            v += clip
            v *= scale
            draws.update_into(zeros[: 4 * n], drawn)
            np.multiply(drawn_u32[:n], 2.0**-32, out=u)
            v += u  # rounds up with the odds of the fractional part
            np.floor(v, out=v)
            np.minimum(v, levels, out=v)
            target[:] = v
            stream = block_u32[:n]
            for encryptor, sign in streams:
                encryptor.update_into(zeros[: 4 * n], block)
                (np.add if sign > 0 else np.subtract)(target, stream, out=target)
        outputs.append(result)
    return outputs


def flat_uint32(tensors: Iterable[torch.Tensor]) -> np.ndarray:
    """``quantise``'s tensors as one uint32 vector (a copy)."""
    return np.concatenate([t.reshape(-1).numpy().view(np.uint32) for t in tensors])


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
