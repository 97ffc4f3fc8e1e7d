"""Aggregation math as pure functions and one streaming accumulator.

Tensors in, tensors out: easy to check against a hand computation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from elastic.wire.messages import WireTensor

__all__ = ["WeightedSum", "weighted_mean"]


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum(w_i * t_i) / sum(w_i). The reference the streaming path is tested against."""
    if not tensors or len(tensors) != len(weights):
        raise ValueError("need one weight per tensor and at least one tensor")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights, strict=True):
        acc.add_(t.to(torch.float64), alpha=float(w))
    return (acc / total).to(tensors[0].dtype)


class WeightedSum:
    """A running ``sum(w_i * update_i)`` over named tensors, folded frame by frame.

    Memory is one accumulator per tensor, whatever the number of updates, and the
    accumulators live across rounds (``reset`` is free): a fresh model-sized buffer
    per round would cost more in page faults than the fold itself. Float32 and lower
    accumulate in float32; float64 stays float64.
    """

    def __init__(self, like: Mapping[str, torch.Tensor]) -> None:
        self.sums = {
            name: torch.empty(t.shape, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
            for name, t in like.items()
        }
        self.reset()

    def reset(self) -> None:
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, WireTensor | torch.Tensor], weight: float) -> None:
        first = self.count == 0
        for name, acc in self.sums.items():
            t = tensors[name]
            if isinstance(t, WireTensor):
                (t.scale_to if first else t.add_to)(acc, alpha=weight)
            elif first:
                torch.mul(t.reshape(acc.shape), weight, out=acc)
            else:
                acc.add_(t.reshape(acc.shape), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean, computed in place: the sum is consumed (``reset`` next)."""
        if self.total_weight <= 0:
            raise ValueError("no weight accumulated")
        for acc in self.sums.values():
            acc.div_(self.total_weight)
        return self.sums
