"""An example third-party aggregation rule: FedAvg with per-update norm clipping.

Each worker's delta (its trained weights minus the global model) is scaled down
to at most ``max_norm`` (L2 over all tensors) before the sample-weighted average,
which bounds how far one worker can pull the model. It streams like FedAvg: one
pass over the frames for the norm, one to fold.

Install it (``pip install ./examples/plugin-clipped-mean``) and use
``rule = "clipped_mean"`` with ``[rule] max_norm = 1.0`` in a job spec.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from elastic.api import Aggregator, JobSpecError, Update, check_params, hookimpl, update_template


class ClippedMean(Aggregator):
    """Sample-weighted mean of deltas, each clipped to ``max_norm``."""

    name = "clipped_mean"
    worker_mode = "train"

    def __init__(self, params: Mapping[str, Any]) -> None:
        p = check_params("rule clipped_mean", params, {"max_norm": float})
        self.max_norm = p.get("max_norm", 1.0)
        if self.max_norm <= 0:
            raise JobSpecError(f"rule clipped_mean: max_norm must be > 0, got {self.max_norm}")
        super().__init__(p)

    def setup(self, model: torch.nn.Module) -> None:
        self.targets = update_template(model, "train")  # the parameters themselves, not views
        self.sums = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in self.targets.items()}
        self.total = 0.0
        self.clipped = 0

    def begin_round(self) -> None:
        for acc in self.sums.values():
            acc.zero_()
        self.total = 0.0

    def _deltas(self, update: Update, name: str):
        """(offset, delta chunk) pairs: the received weights minus the global model."""
        base = self.targets[name].detach().reshape(-1)
        for offset, chunk in update.tensors[name].iter_chunks():
            yield offset, chunk.float() - base[offset : offset + chunk.numel()]

    def accumulate(self, update: Update) -> None:
        squares = sum(
            float(d.pow(2).sum()) for name in self.sums for _, d in self._deltas(update, name)
        )
        norm = math.sqrt(squares)
        scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
        self.clipped += scale < 1.0
        for name, acc in self.sums.items():
            flat = acc.view(-1)
            for offset, d in self._deltas(update, name):
                flat[offset : offset + d.numel()].add_(d, alpha=update.num_samples * scale)
        self.total += update.num_samples

    def finalize(self) -> None:
        if self.total <= 0:
            return
        with torch.no_grad():
            for name, acc in self.sums.items():
                self.targets[name].add_(acc, alpha=1.0 / self.total)


@hookimpl
def elastic_aggregators() -> list[type]:
    return [ClippedMean]


@hookimpl
def elastic_round_completed(job_id: str, round: int, metrics: dict) -> None:
    """An observer hook too: a third-party plugin can watch rounds as well."""
    metrics.setdefault("observed_by", "clipped_mean")
