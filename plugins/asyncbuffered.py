"""``async``: asynchronous, staleness-bounded aggregation (FedAsync and FedBuff).

Workers train on whatever version they last received and send their delta (trained
minus received weights). The rule folds each delta in as it arrives, weighted by
its sample count and a staleness function s(τ); after ``buffer`` updates (K) it
writes a new version:

    w <- w + mixing * sum_i n_i s(τ_i) Δ_i / sum_i n_i

K = 1 is FedAsync (Xie et al. 2019): with τ = 0 it is exactly
w <- (1 - mixing) w + mixing w_i. K > 1 is FedBuff (Nguyen et al. 2022). Dividing
by the samples (not by the staleness-weighted samples) makes stale updates count
for less. Updates staler than ``max_staleness`` never reach the rule: the engine
refuses them and sends the worker the current model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from elastic_plugins.averaging import WeightedSum
from elastic_plugins.staleness import staleness_function

from elastic.api import (
    AsyncAggregator,
    JobSpecError,
    Update,
    check_params,
    hookimpl,
    update_template,
)

__all__ = ["AsyncBuffered"]


class AsyncBuffered(AsyncAggregator):
    """Staleness-weighted asynchronous averaging of deltas.

    Parameters (``[rule]``):
        buffer: K, updates per new version (default 1: FedAsync; > 1: FedBuff).
        mixing: the server rate in (0, 1] applied to the buffered mean (default 1.0).
        max_staleness: refuse updates more than this many versions old (default 10).
        staleness: ``"constant"``, ``"polynomial"`` (default) or ``"hinge"``.
        staleness_a: the exponent of ``polynomial`` (default 0.5) or the slope of
            ``hinge`` (default 10).
        staleness_b: where ``hinge`` starts to decay (default 4).
    """

    name = "async"
    averages = True

    def __init__(self, params: Mapping[str, Any]) -> None:
        owner = "rule async"
        p = check_params(
            owner,
            params,
            {
                "buffer": int,
                "mixing": float,
                "max_staleness": int,
                "staleness": str,
                "staleness_a": float,
                "staleness_b": int,
            },
        )
        self.buffer = p.get("buffer", 1)
        self.mixing = p.get("mixing", 1.0)
        self.max_staleness = p.get("max_staleness", 10)
        if self.buffer < 1:
            raise JobSpecError(f"{owner}: buffer must be >= 1, got {self.buffer}")
        if not 0 < self.mixing <= 1:
            raise JobSpecError(f"{owner}: mixing must be in (0, 1], got {self.mixing}")
        if self.max_staleness < 0:
            raise JobSpecError(f"{owner}: max_staleness must be >= 0, got {self.max_staleness}")
        self.weight_of = staleness_function(
            p.get("staleness", "polynomial"), p.get("staleness_a"), p.get("staleness_b"), owner
        )
        super().__init__(p)

    def staleness_weight(self, staleness: int) -> float:
        return self.weight_of(staleness)

    def setup(self, model: torch.nn.Module) -> None:
        self._targets = update_template(model, "delta")
        self._sum = WeightedSum(self._targets)
        self._samples = 0

    def begin_round(self) -> None:
        self._sum.reset()
        self._samples = 0

    def accumulate(self, update: Update) -> None:
        samples = max(update.num_samples, 0)
        self._sum.add(update.tensors, float(samples) * self.weight_of(update.staleness))
        self._samples += samples

    def ready(self) -> bool:
        return self._sum.count >= self.buffer

    def finalize(self) -> None:
        if self._samples <= 0 or self._sum.total_weight <= 0:
            return  # only empty shards so far: nothing to learn from
        scale = self.mixing / self._samples
        with torch.no_grad():
            for name, acc in self._sum.sums.items():
                w = self._targets[name]
                w.add_(acc.view(w.shape).to(w.dtype), alpha=scale)
        self.begin_round()


@hookimpl
def elastic_aggregators() -> list[type]:
    return [AsyncBuffered]
