"""The simplest case: a task made of functions in one file (``task_of``), named by
its path, trained in simulation and by a worker's runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from elastic.errors import JobSpecError
from elastic.jobspec import load_job_spec
from elastic.plugins import Plugins
from elastic.simulation import simulate

FUNCTIONS = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

from elastic.api import task_of


def model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))


def points(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    return TensorDataset(x, (x[:, 0] * x[:, 1] > 0).long())


def data(shard, data_dir):
    return points(100 + shard.index, 256)


def test_data(data_dir):
    return points(0, 512)


def loss(model, inputs, targets):
    return nn.functional.cross_entropy(model(inputs), targets)


def metrics(model, inputs, targets):
    return {"accuracy": (model(inputs).argmax(1) == targets).sum().item()}


Quadrants = task_of(model=model, data=data, test_data=test_data, loss=loss, metrics=metrics)
"""


def test_a_task_of_functions_trains(tmp_path: Path) -> None:
    (tmp_path / "quadrants.py").write_text(FUNCTIONS)
    (tmp_path / "q.toml").write_text(
        '[job]\ntask = "./quadrants.py:Quadrants"\nrule = "fedavg"\nrounds = 25\n'
        "min_workers = 2\n[train]\nlocal_epochs = 3\nlr = 0.5\nbatch_size = 32\n"
    )
    job = simulate(load_job_spec(tmp_path / "q.toml"), 2, Plugins(), tmp_path / "state")
    assert job.history[-1]["accuracy"] >= 0.9, [h["accuracy"] for h in job.history]


def test_a_task_of_functions_takes_no_parameters(tmp_path: Path) -> None:
    (tmp_path / "quadrants.py").write_text(FUNCTIONS)
    task = Plugins().task(f"{tmp_path}/quadrants.py:Quadrants")
    assert not task.owns_training_loop()
    with pytest.raises(JobSpecError, match="takes no \\[task\\] parameters, got \\['size'\\]"):
        task({"size": 3})
    with pytest.raises(TypeError, match="loss must be a function"):
        from elastic.api import task_of

        task_of(model=len, data=len, test_data=len, loss=3)  # type: ignore[arg-type]
