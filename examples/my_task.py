"""A task of your own, with no plugin to package: the job names this file
(`task = "./my_task.py:Circles"`), and `elastic run examples/my-task.toml` trains it.

Points in a square, labelled inside or outside the unit circle; a small network
learns the boundary. `train` is optional: without it the runtime's loop runs
([train] local_epochs, batch_size, lr, optimizer); with it the loop is yours.
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from elastic.api import Task, TrainResult


class Circles(Task):
    def build_model(self, seed):
        torch.manual_seed(seed)  # every worker and the coordinator build the same start
        return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))

    def points(self, seed, n):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, 2, generator=g) * 3 - 1.5
        return TensorDataset(x, (x.norm(dim=1) < 1).long())

    def train_dataset(self, shard, data_dir):  # this worker's part of the data
        return self.points(1000 + shard.index, 512)

    def test_dataset(self, data_dir):  # the coordinator evaluates the global model on it
        return self.points(0, 2048)

    def loss(self, model, inputs, targets):
        return nn.functional.cross_entropy(model(inputs), targets)

    def metrics(self, model, inputs, targets):  # sums over the batch
        return {"accuracy": (model(inputs).argmax(dim=1) == targets).sum().item()}

    def train(self, model, dataset, ctx):  # optional: your own loop
        x, y = dataset.tensors
        optimizer = torch.optim.Adam(model.parameters(), lr=ctx.params.lr)
        order = torch.Generator().manual_seed(ctx.seed)
        for _ in range(ctx.params.local_epochs):
            for batch in torch.randperm(len(x), generator=order).split(ctx.params.batch_size):
                ctx.check()  # returns at once when the worker stops
                optimizer.zero_grad()
                loss = self.loss(model, x[batch], y[batch])
                loss.backward()
                optimizer.step()
        return TrainResult(num_samples=len(x), loss=loss.item())
