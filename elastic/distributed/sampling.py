"""Which samples each rank trains on at each step, so that membership can change
mid-epoch and every sample is still seen once per epoch.

An epoch is one permutation of the whole dataset (seeded by the job and the epoch).
A step takes the next ``world * batch`` samples of it (the rest of the epoch, if
fewer; ``batch`` 0: the whole rest, i.e. full-batch) and splits them into ``world``
contiguous chunks, one per rank. The position in the epoch is all a new generation
needs: its members split what is left, whatever the world size was before.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["Position", "StepSlice", "step_slice"]


@dataclass(frozen=True)
class Position:
    """Where training is: completed steps, the epoch, and samples of it consumed."""

    step: int = 0
    epoch: int = 0
    offset: int = 0


@dataclass(frozen=True)
class StepSlice:
    """One rank's samples of one step, and the step's total over all ranks."""

    indices: torch.Tensor
    global_count: int
    after: Position


@functools.lru_cache(maxsize=2)  # the epoch running (and the one before): once, not per step
def _epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def step_slice(size: int, seed: int, at: Position, world: int, rank: int, batch: int) -> StepSlice:
    """The samples ``rank`` of ``world`` trains on at the step after ``at``."""
    if size < 1 or world < 1 or not 0 <= rank < world or batch < 0:
        raise ValueError(f"bad step: size={size} world={world} rank={rank} batch={batch}")
    left = size - at.offset
    count = left if batch == 0 else min(world * batch, left)
    chunk = _epoch_order(size, seed, at.epoch)[at.offset : at.offset + count]
    bounds = [count * r // world for r in range(world + 1)]
    mine = chunk[bounds[rank] : bounds[rank + 1]]
    offset = at.offset + count
    after = (
        Position(at.step + 1, at.epoch + 1, 0)
        if offset >= size
        else Position(at.step + 1, at.epoch, offset)
    )
    return StepSlice(mine, count, after)
