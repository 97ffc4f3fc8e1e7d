"""``synthetic``: a model of any size with almost no compute, to measure the system.

The model is ``tensors`` float32 tensors holding ``params`` values in all, drawn at
random (random, so that no transport or framework can shortcut identical bytes).
Each worker's shard has ``samples`` rows; one local epoch is ``samples / batch_size``
steps, each touching every parameter once. What a round costs is then almost all
moving, checking and folding the model: the part of a round that is ``elastic``'s,
not the task's. The benchmarks use it; so can anyone sizing a cluster::

    [job]
    task = "synthetic"
    [task]
    params = 25_000_000
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

__all__ = ["Synthetic"]

FEATURES = 4


class Synthetic(Task):
    """Random parameters, a loss linear in them, random rows.

    Parameters (``[task]``):
        params: float32 parameters in the model (default 1 000 000).
        tensors: how many tensors hold them, like the layers of a network (default 4).
        samples: rows per shard and in the test set (default 8).
        data_seed: seed of the rows (default 0).
    """

    name = "synthetic"

    def __init__(self, params: Mapping[str, Any]) -> None:
        p = check_params(
            "task synthetic",
            params,
            {"params": int, "tensors": int, "samples": int, "data_seed": int},
        )
        self.size = p.get("params", 1_000_000)  # (self.params is the [task] table)
        self.tensors = p.get("tensors", 4)
        self.samples = p.get("samples", 8)
        self.data_seed = p.get("data_seed", 0)
        for key, value in (
            ("params", self.size),
            ("tensors", self.tensors),
            ("samples", self.samples),
        ):
            if value < 1:
                raise JobSpecError(f"task synthetic: {key} must be >= 1, got {value}")
        if self.tensors > self.size:
            raise JobSpecError(
                f"task synthetic: tensors ({self.tensors}) cannot exceed params ({self.size})"
            )
        super().__init__(p)

    def build_model(self, seed: int) -> nn.Module:
        sizes = [
            self.size // self.tensors + (1 if i < self.size % self.tensors else 0)
            for i in range(self.tensors)
        ]

        def build() -> nn.Module:
            model = nn.Module()
            for i, size in enumerate(sizes):
                model.register_parameter(f"layer{i}", nn.Parameter(torch.randn(size).mul_(0.01)))
            return model

        return seeded(seed, build)

    def _rows(self, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(self.data_seed * 1_000_003 + seed)
        return TensorDataset(
            torch.randn(self.samples, FEATURES, generator=g), torch.randn(self.samples, generator=g)
        )

    def train_dataset(self, shard: Shard, data_dir: Path | None) -> TensorDataset:
        return self._rows(shard.index + 1)

    def test_dataset(self, data_dir: Path | None) -> TensorDataset:
        return self._rows(0)

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Linear in every parameter (its gradient is a fill, the cheapest that
        # touches them all) and bounded below only by the data: a few steps at a
        # small rate keep it finite, which is all a systems benchmark needs.
        scale = (inputs.mean(dim=1) - targets).mean()
        return sum(p.mean() for p in model.parameters()) * scale + scale.pow(2)


@hookimpl
def elastic_tasks() -> list[type]:
    return [Synthetic]
