"""The arithmetic of differential privacy on updates, as pure functions: norms,
clipping, Gaussian noise, and adaptive clipping (Andrew et al., "Differentially
Private Learning with Adaptive Clipping", NeurIPS 2021).

Noise is drawn from a generator seeded by the operating system's entropy: noise
anyone could regenerate from a job's seed would protect nothing.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping

import torch

__all__ = [
    "l2_norm",
    "clip_",
    "add_noise_",
    "secure_generator",
    "next_clip",
    "delta_noise_multiplier",
]


def l2_norm(tensors: Iterable[torch.Tensor]) -> float:
    """The L2 norm of the tensors taken as one vector (accumulated in float64)."""
    total = 0.0
    for t in tensors:
        total += float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
    return math.sqrt(total)


def clip_(tensors: Mapping[str, torch.Tensor], bound: float) -> float:
    """Scale ``tensors`` in place so their joint L2 norm is at most ``bound``;
    returns the norm they had."""
    norm = l2_norm(tensors.values())
    if norm > bound:
        scale = bound / norm
        for t in tensors.values():
            t.mul_(scale)
    return norm


def secure_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits from ``secrets`` (the OS's entropy)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


def add_noise_(tensors: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> None:
    """Add N(0, std²) to every element of ``tensors``, in place."""
    if std <= 0:
        return
    for t in tensors.values():
        noise = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        noise.normal_(0.0, std, generator=generator)
        t.add_(noise)


def next_clip(clip: float, below: float, quantile: float, rate: float) -> float:
    """The geometric update of the clipping norm towards the ``quantile`` of the
    update norms: ``C exp(-rate (below - quantile))``, where ``below`` is the
    (noised) share of updates whose norm was at most C."""
    return clip * math.exp(-rate * (below - quantile))


def delta_noise_multiplier(z: float, count_std: float) -> float:
    """The noise multiplier left for the updates' sum when the count of unclipped
    updates takes noise of standard deviation ``count_std`` and both together must
    be worth a Gaussian mechanism of multiplier ``z`` (Andrew et al., Theorem 1:
    z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2)). Needs 2σ_b > z."""
    if count_std <= 0:
        return z
    rest = z**-2 - (2 * count_std) ** -2
    if rest <= 0:
        raise ValueError(f"count noise {count_std} leaves no budget for the updates at z = {z}")
    return rest**-0.5
