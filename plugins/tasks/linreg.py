"""``linreg``: synthetic least squares with a known optimum.

``y = X w* + b* + noise``, generated from ``data_seed``. Training rows are split
into contiguous, disjoint parts, one per shard. Because the optimum is known (and
the full-batch problem is deterministic) this task is how rules are checked against
single-process training.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from elastic_plugins.tasks import seeded
from torch import nn
from torch.utils.data import TensorDataset

from elastic.api import JobSpecError, Shard, Task, check_params, hookimpl

__all__ = ["LinReg"]


class LinReg(Task):
    """Linear regression, mean squared error.

    Parameters (``[task]``):
        samples: training rows (default 1200).
        test_samples: evaluation rows (default 300).
        features: input dimension (default 10).
        noise: standard deviation of the label noise (default 0.1).
        data_seed: seed of the synthetic data (default 0).
    """

    name = "linreg"

    def __init__(self, params: Mapping[str, Any]) -> None:
        p = check_params(
            "task linreg",
            params,
            {
                "samples": int,
                "test_samples": int,
                "features": int,
                "noise": float,
                "data_seed": int,
            },
        )
        self.samples = p.get("samples", 1200)
        self.test_samples = p.get("test_samples", 300)
        self.features = p.get("features", 10)
        self.noise = p.get("noise", 0.1)
        self.data_seed = p.get("data_seed", 0)
        for key in ("samples", "test_samples", "features"):
            if getattr(self, key) < 1:
                raise JobSpecError(f"task linreg: {key} must be >= 1, got {getattr(self, key)}")
        if self.noise < 0:
            raise JobSpecError(f"task linreg: noise must be >= 0, got {self.noise}")
        super().__init__(p)

    def optimum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The true (w*, b*) the data was generated from."""
        g = torch.Generator().manual_seed(self.data_seed)
        return torch.randn(1, self.features, generator=g), torch.randn(1, generator=g)

    def _rows(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = self.optimum()
        g = torch.Generator().manual_seed(self.data_seed + 1)
        total = self.samples + self.test_samples
        x = torch.randn(total, self.features, generator=g)
        y = x @ w.T + b + self.noise * torch.randn(total, 1, generator=g)
        return x[start : start + count], y[start : start + count]

    def build_model(self, seed: int) -> nn.Module:
        return seeded(seed, lambda: nn.Linear(self.features, 1))

    def train_dataset(self, shard: Shard, data_dir: Path | None) -> TensorDataset:
        index, count = shard.index % shard.count, shard.count
        bounds = [self.samples * i // count for i in range(count + 1)]
        return TensorDataset(*self._rows(bounds[index], bounds[index + 1] - bounds[index]))

    def test_dataset(self, data_dir: Path | None) -> TensorDataset:
        return TensorDataset(*self._rows(self.samples, self.test_samples))

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(model(inputs), targets)


@hookimpl
def elastic_tasks() -> list[type]:
    return [LinReg]
