from __future__ import annotations

import numpy as np
import pytest
import torch
from elastic_plugins.tasks.digits import Digits, dirichlet_split
from elastic_plugins.tasks.linreg import LinReg

from elastic.api import Shard
from elastic.errors import JobSpecError
from elastic.plugins import Plugins
from elastic.training import evaluate


def test_dirichlet_split_is_a_partition_and_non_iid() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet_split(labels, 4, 0.5, seed=3)
    joined = np.sort(np.concatenate(parts))
    assert np.array_equal(joined, np.arange(1000))
    mixes = [np.bincount(labels[p], minlength=10) / len(p) for p in parts]
    assert max(np.abs(m - 0.1).max() for m in mixes) > 0.1  # far from uniform
    assert all(np.array_equal(a, b) for a, b in zip(parts, dirichlet_split(labels, 4, 0.5, seed=3), strict=True))


def test_digits_shards_are_disjoint_and_test_set_held_out() -> None:
    task = Digits({})
    shards = [task.train_dataset(Shard(i, 3, 0), None) for i in range(3)]
    test = task.test_dataset(None)
    rows = {tuple(x.tolist()) for s in shards for x in s.tensors[0]}
    assert sum(len(s) for s in shards) + len(test) == 1797
    assert len(rows & {tuple(x.tolist()) for x in test.tensors[0]}) < 10  # digits has a few duplicate images


def test_linreg_shards_cover_the_data() -> None:
    task = LinReg({"samples": 100})
    shards = [task.train_dataset(Shard(i, 3, 0), None) for i in range(3)]
    assert [len(s) for s in shards] == [33, 33, 34]
    full = torch.cat([s.tensors[0] for s in shards])
    assert torch.equal(full, task._rows(0, 100)[0])


@pytest.mark.parametrize("name", Plugins().tasks.names())
def test_task_conformance(name: str) -> None:
    task = Plugins().tasks.get(name)({})
    a, b = task.build_model(7), task.build_model(7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    data = task.train_dataset(Shard(0, 2, 0), None)
    x, y = data[0:4]
    loss = task.loss(a, x, y)
    assert loss.dim() == 0 and loss.requires_grad
    figures = evaluate(task, a, task.test_dataset(None))
    assert "eval_loss" in figures and np.isfinite(figures["eval_loss"])


def test_task_param_errors() -> None:
    with pytest.raises(JobSpecError, match="alpha must be > 0"):
        Digits({"alpha": 0})
    with pytest.raises(JobSpecError, match="unknown parameter 'size'"):
        LinReg({"size": 3})
