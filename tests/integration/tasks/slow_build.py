"""A task whose data takes a while to load (``[task] load_seconds``), as a real
dataset does: what a worker builds before its first round."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from elastic.api import Task


class SlowBuild(Task):
    name = "slow-build"

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.load_seconds = float(params.get("load_seconds", 2.0))
        self.loaded = False

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(4, 1)

    def train_dataset(self, shard, data_dir) -> TensorDataset:
        if not self.loaded:  # once per process, as a task caches what it read
            time.sleep(self.load_seconds)
            self.loaded = True
        g = torch.Generator().manual_seed(shard.index)
        x = torch.randn(32, 4, generator=g)
        return TensorDataset(x, x.sum(dim=1, keepdim=True))

    def test_dataset(self, data_dir) -> TensorDataset:
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(99))
        return TensorDataset(x, x.sum(dim=1, keepdim=True))

    def loss(self, model, inputs, targets):
        return nn.functional.mse_loss(model(inputs), targets)
