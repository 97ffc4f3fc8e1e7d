"""Aggregation math as pure functions, one streaming accumulator, and the base of
the rules that step the model along the mean delta (FedAvg, FedOpt).

Tensors in, tensors out: easy to check against a hand computation.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from elastic.api import Aggregator, Update, check_params
from elastic.errors import JobSpecError
from elastic.training import update_template
from elastic.wire.messages import WireTensor

__all__ = ["WeightedSum", "weighted_mean", "MeanDeltaRule"]


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
        self._sums = {
            name: torch.empty(t.shape, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
            for name, t in like.items()
        }
        self.reset()

    def reset(self) -> None:
        self.total_weight = 0.0
        self.count = 0
        # A first update that lies in a worker's shared-memory segment is held, not
        # folded: the second is folded with it in one pass (``_fold_two``).
        self._held: tuple[Mapping[str, WireTensor], float] | None = None

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        """The running sums (a held first update folded in now)."""
        if self._held is not None:
            first, weight = self._held
            self._held = None
            for name, acc in self._sums.items():
                first[name].scale_to(acc, alpha=weight)
        return self._sums

    def add(self, tensors: Mapping[str, WireTensor | torch.Tensor], weight: float) -> None:
        if self.count == 0 and tensors and all(isinstance(t, WireTensor) and t.shared for t in tensors.values()):
            self._held = ({k: t for k, t in tensors.items() if isinstance(t, WireTensor)}, weight)
        elif self._held is not None:
            first, first_weight = self._held
            self._held = None
            for name, acc in self._sums.items():
                _fold_two(acc, first[name], first_weight, tensors[name], weight)
        else:
            first_update = self.count == 0
            for name, acc in self._sums.items():
                t = tensors[name]
                if isinstance(t, WireTensor):
                    (t.scale_to if first_update else t.add_to)(acc, alpha=weight)
                elif first_update:
                    torch.mul(t.reshape(acc.shape), weight, out=acc)
                else:
                    acc.add_(t.reshape(acc.shape), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean, computed in place: the sum is consumed (``reset`` next)."""
        if self.total_weight <= 0:
            raise ValueError("no weight accumulated")
        sums = self.sums
        for acc in sums.values():
            acc.div_(self.total_weight)
        return sums


# Elements of the sum written at a time by ``_fold_two``: 4 MiB of float32, in cache
# between the first update's write and the second's add.
FOLD_BLOCK = 1 << 20


def _fold_two(acc: torch.Tensor, first: WireTensor, a: float, second: WireTensor | torch.Tensor, b: float) -> None:
    """``acc = a * first + b * second`` a block at a time: each block of the sum is
    written, then added to while in cache. Per update folded from shared memory the
    sum is written once, not written then read and written again (25M float32: 400
    -> 200 MB through memory for two updates); the result is bit for bit that of
    ``scale_to`` then ``add_to``."""
    flat = acc.view(-1)
    other = second if isinstance(second, WireTensor) else WireTensor.from_tensor(second.reshape(-1))
    for start in range(0, flat.numel(), FOLD_BLOCK):
        stop = min(start + FOLD_BLOCK, flat.numel())
        first.scale_to(acc, alpha=a, start=start, stop=stop)
        other.add_to(acc, alpha=b, start=start, stop=stop)


class MeanDeltaRule(Aggregator):
    """A train-mode rule that averages the workers' trained weights and steps the
    model along the mean delta (``mean(w_i) - w``, the pseudo-gradient of Reddi et
    al. 2021 with the sign of a step). Subclasses say how: ``apply_step``.

    ``weighting`` (``"samples"``, the default, or ``"uniform"``) is every such
    rule's parameter; ``check`` validates it with the subclass's own.
    """

    worker_mode = "train"

    def check(self, owner: str, params: Mapping[str, Any], allowed: Mapping[str, type | tuple]) -> dict[str, Any]:
        """Validate ``params`` against ``allowed`` plus ``weighting``; sets ``self.params``."""
        p = check_params(owner, params, {**allowed, "weighting": str})
        self.weighting = p.get("weighting", "samples")
        if self.weighting not in ("samples", "uniform"):
            raise JobSpecError(f'{owner}: weighting must be "samples" or "uniform", got {self.weighting!r}')
        self.params = p
        return p

    @property
    def plain(self) -> bool:
        """True when the new model is just the mean (written in one pass)."""
        return False

    @abstractmethod
    def apply_step(self, name: str, w: torch.Tensor, step: torch.Tensor) -> None:
        """Move parameter ``w`` (a model tensor) by the mean delta ``step`` (scratch memory)."""

    def setup(self, model: torch.nn.Module) -> None:
        self._targets = update_template(model, "train")
        self._sum = WeightedSum(self._targets)

    def begin_round(self) -> None:
        self._sum.reset()

    def accumulate(self, update: Update) -> None:
        weight = 1.0 if self.weighting == "uniform" else float(update.num_samples)
        self._sum.add(update.tensors, weight)

    def finalize(self) -> None:
        if self._sum.total_weight <= 0:
            return  # every update came from an empty shard: nothing to learn from
        total = self._sum.total_weight
        with torch.no_grad():
            for name, acc in self._sum.sums.items():
                w = self._targets[name]
                if self.plain:  # w = mean, one pass
                    torch.div(acc, total, out=w.view(acc.shape))
                    continue
                step = acc.div_(total).sub_(w.view(acc.shape))  # mean weights - w = mean delta
                self.apply_step(name, w, step)
        self._sum.reset()
