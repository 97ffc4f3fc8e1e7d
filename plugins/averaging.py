"""Aggregation math as pure functions, one streaming accumulator, and the base of
the rules that step the model along the mean delta (FedAvg, FedOpt).

Tensors in, tensors out: easy to check against a hand computation.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from elastic.api import (
    Aggregator,
    JobSpecError,
    Partial,
    Update,
    WireTensor,
    check_params,
    update_template,
)

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
            name: torch.empty(
                t.shape, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32
            )
            for name, t in like.items()
        }
        self.reset()

    def reset(self) -> None:
        self.total_weight = 0.0  # of the updates that came whole
        self.count = 0
        # A first update that lies in a worker's shared-memory segment is held, not
        # folded: the second is folded with it in one pass (``_fold_two``).
        self._held: tuple[Mapping[str, WireTensor], float] | None = None
        # Updates that came in parts: per part, the weight folded into it and where
        # it lies. The sums were zeroed before the first part (``_written``).
        self._part_weight: dict[tuple[tuple[str, int, int], ...], float] = {}
        # Partials merged whose weight differs along a tensor: (name, start, stop, weight).
        self._ranges: list[tuple[str, int, int, float]] = []
        self._written = False

    @property
    def any_weight(self) -> bool:
        """Whether anything with a positive weight was folded."""
        return (
            self.total_weight > 0
            or any(w > 0 for w in self._part_weight.values())
            or any(w > 0 for *_, w in self._ranges)
        )

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
        first_update = self.count == 0 and not self._written
        if (
            first_update
            and tensors
            and all(isinstance(t, WireTensor) and t.shared for t in tensors.values())
        ):
            self._held = ({k: t for k, t in tensors.items() if isinstance(t, WireTensor)}, weight)
        elif self._held is not None:
            first, first_weight = self._held
            self._held = None
            for name, acc in self._sums.items():
                _fold_two(acc, first[name], first_weight, tensors[name], weight)
        else:
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
        self._written = True

    def add_part(
        self,
        segments: Sequence[tuple[str, int, int]],
        tensors: Mapping[str, WireTensor],
        weight: float,
    ) -> None:
        """Fold one part of an update: ``tensors[name]`` holds elements ``start:stop``
        of ``name`` for each segment (``elastic.wire.parts``)."""
        sums = self.sums
        if not self._written:  # a part covers some elements only: the others must read 0
            for acc in sums.values():
                acc.zero_()
            self._written = True
        for name, start, stop in segments:
            tensors[name].add_to(sums[name].view(-1)[start:stop], alpha=weight)
        part = tuple(segments)
        self._part_weight[part] = self._part_weight.get(part, 0.0) + weight

    def weights(self) -> dict[str, list[tuple[int, int, float]]]:
        """Per tensor, ``(start, stop, weight)``: the weight folded into those elements.
        One range per tensor unless updates came in parts; where an update stopped
        halfway, the parts it sent weigh more than the ones it did not."""
        out = {name: [(0, acc.numel(), self.total_weight)] for name, acc in self._sums.items()}
        extra: dict[str, list[tuple[int, int, float]]] = {name: [] for name in out}
        for part, weight in self._part_weight.items():
            for name, start, stop in part:
                extra[name].append((start, stop, weight))
        for name, start, stop, weight in self._ranges:
            extra[name].append((start, stop, weight))
        for name, pieces in extra.items():
            if not pieces:
                continue
            # Each stretch between two cuts has one weight: the whole updates' plus
            # every piece over it (the elements no piece reached: the whole updates').
            ends = {0, self._sums[name].numel()}
            cuts = sorted(ends | {s for s, _, _ in pieces} | {e for _, e, _ in pieces})
            out[name] = [
                (a, b, self.total_weight + sum(w for s, e, w in pieces if s <= a and b <= e))
                for a, b in zip(cuts, cuts[1:], strict=False)
            ]
        return out

    def merge(self, partial: Partial) -> None:
        """Fold another sum's ``partial`` (its mean and weights): as if the updates
        it holds were added here."""
        weights = {w for rs in partial.weights.values() for *_, w in rs}
        if not any(w > 0 for w in weights):
            return  # (nothing was folded into it)
        if len(weights) == 1 and all(
            len(rs) == 1 and rs[0][:2] == (0, self._sums[name].numel())
            for name, rs in partial.weights.items()
        ):
            self.add(partial.tensors, weights.pop())  # one weight everywhere: as an update
            return
        sums = self.sums
        if not self._written:
            for acc in sums.values():
                acc.zero_()
            self._written = True
        for name, rs in partial.weights.items():
            flat, acc = partial.tensors[name].reshape(-1), sums[name].view(-1)
            for start, stop, weight in rs:
                if weight > 0:
                    acc[start:stop].add_(flat[start:stop].to(acc.dtype), alpha=weight)
                    self._ranges.append((name, start, stop, weight))

    def partial(self) -> Partial:
        """The sum as a ``Partial``: its mean (computed in place: the sum is
        consumed, and the tensors are this sum's own until its next round) and
        weights."""
        if not self.any_weight:
            return Partial({}, {})
        weights = self.weights()
        return Partial(self.mean(), weights)

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean, computed in place: the sum is consumed (``reset`` next).
        Elements no update reached read 0."""
        if not self.any_weight:
            raise ValueError("no weight accumulated")
        sums = self.sums
        for name, ranges in self.weights().items():
            flat = sums[name].view(-1)
            for start, stop, weight in ranges:
                if weight > 0:
                    flat[start:stop].div_(weight)
                else:
                    flat[start:stop].zero_()
        return sums


# Elements of the sum written at a time by ``_fold_two``: 4 MiB of float32, in cache
# between the first update's write and the second's add.
FOLD_BLOCK = 1 << 20


def _fold_two(
    acc: torch.Tensor, first: WireTensor, a: float, second: WireTensor | torch.Tensor, b: float
) -> None:
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
    averages = True

    def check(
        self, owner: str, params: Mapping[str, Any], allowed: Mapping[str, type | tuple]
    ) -> dict[str, Any]:
        """Validate ``params`` against ``allowed`` plus ``weighting``; sets ``self.params``."""
        p = check_params(owner, params, {**allowed, "weighting": str})
        self.weighting = p.get("weighting", "samples")
        if self.weighting not in ("samples", "uniform"):
            raise JobSpecError(
                f'{owner}: weighting must be "samples" or "uniform", got {self.weighting!r}'
            )
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

    folds_parts = True

    def _weight(self, update: Update) -> float:
        return 1.0 if self.weighting == "uniform" else float(update.num_samples)

    def accumulate(self, update: Update) -> None:
        self._sum.add(update.tensors, self._weight(update))

    def accumulate_part(self, update: Update, segments: Sequence[tuple[str, int, int]]) -> None:
        self._sum.add_part(segments, update.tensors, self._weight(update))

    decomposable = True  # (the mean of the trained weights, whatever the step after)

    def partial(self) -> Partial:
        return self._sum.partial()

    def merge(self, partial: Partial) -> None:
        self._sum.merge(partial)

    def finalize(self) -> None:
        if not self._sum.any_weight:
            return  # every update came from an empty shard: nothing to learn from
        weights = self._sum.weights()
        with torch.no_grad():
            for name, acc in self._sum.sums.items():
                w = self._targets[name].view(-1)
                flat = acc.view(-1)
                for start, stop, weight in weights[name]:
                    if self.plain:  # w = mean, one pass; where no update came, w stays
                        if weight > 0:
                            torch.div(flat[start:stop], weight, out=w[start:stop])
                    elif weight > 0:
                        flat[start:stop].div_(weight).sub_(
                            w[start:stop]
                        )  # mean weights - w = mean delta
                    else:
                        flat[start:stop].zero_()
                if not self.plain:
                    self.apply_step(name, self._targets[name], acc)
        self._sum.reset()
