"""First-party training tasks."""

from __future__ import annotations

import torch

__all__ = ["seeded"]


def seeded(seed: int, build):  # type: ignore[no-untyped-def]
    """Run ``build()`` with torch's global RNG seeded, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
