"""A task that says who trained on what: each client's data carries its index, and
its own loop writes one line per training (round, client, the index its data
carries, process) to the file ``[task] log``. Loaded by file path, as a user's is."""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import TensorDataset

from elastic.api import Task, TrainResult


class ProbeClients(Task):
    name = "probe-clients"

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.log = str(params["log"])
        self.dim = int(params.get("dim", 500))  # dim * dim weights: the model's size

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(self.dim, self.dim, bias=False)

    def train_dataset(self, shard, data_dir) -> TensorDataset:
        return TensorDataset(
            torch.full((2, self.dim), float(shard.index)), torch.zeros(2, self.dim)
        )

    def test_dataset(self, data_dir) -> TensorDataset:
        return TensorDataset(torch.ones(2, self.dim), torch.zeros(2, self.dim))

    def loss(self, model, inputs, targets):
        return nn.functional.mse_loss(model(inputs), targets)

    def train(self, model, dataset, ctx) -> TrainResult:
        inputs, targets = dataset.tensors
        with torch.no_grad():
            model.weight.mul_(0.999)  # some change, so the update is not the model sent
        line = f"{ctx.round} {ctx.client} {int(inputs[0, 0])} {os.getpid()}\n"
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line.encode())  # one write: lines from two processes never mix
        finally:
            os.close(fd)
        return TrainResult(len(inputs), 0.5, {"client": float(ctx.client)})
