"""The model both sides of ``vs_torchrun.py`` train: an MLP of about 25 M float32
parameters on random rows, as a task elastic loads by path (``BenchMLP``) and as the
module torchrun's script builds (``build``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from elastic.api import Task

INPUTS = 1024


def build(hidden: int, seed: int = 0) -> nn.Module:
    """Three layers: 1024 -> hidden -> hidden -> 1 (hidden 4608: 26.0 M parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(INPUTS, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 1),
    )


def rows(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, INPUTS, generator=g), torch.randn(count, 1, generator=g)


class BenchMLP(Task):
    name = "bench-mlp"

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.hidden = int(params.get("hidden", 4608))
        self.samples = int(params.get("samples", 4096))

    def build_model(self, seed: int) -> nn.Module:
        return build(self.hidden, seed)

    def train_dataset(self, shard, data_dir) -> TensorDataset:
        return TensorDataset(*rows(self.samples, 1))

    def test_dataset(self, data_dir) -> TensorDataset:
        return TensorDataset(*rows(64, 2))

    def loss(self, model, inputs, targets):
        return nn.functional.mse_loss(model(inputs), targets)
