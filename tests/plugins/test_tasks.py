from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from elastic_plugins.tasks.digits import Digits
from elastic_plugins.tasks.linreg import LinReg
from elastic_plugins.tasks.synthetic import Synthetic

from elastic.api import Shard, partition
from elastic.errors import JobSpecError
from elastic.plugins import Plugins
from elastic.training import evaluate


def test_dirichlet_split_is_a_partition_and_non_iid() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition(labels, 4, "dirichlet:0.5", seed=3)
    joined = np.sort(np.concatenate(parts))
    assert np.array_equal(joined, np.arange(1000))
    mixes = [np.bincount(labels[p], minlength=10) / len(p) for p in parts]
    assert max(np.abs(m - 0.1).max() for m in mixes) > 0.1  # far from uniform
    assert all(
        np.array_equal(a, b)
        for a, b in zip(parts, partition(labels, 4, "dirichlet:0.5", seed=3), strict=True)
    )


def test_digits_shards_are_disjoint_and_test_set_held_out() -> None:
    task = Digits({})
    shards = [task.train_dataset(Shard(i, 3, 0), None) for i in range(3)]
    test = task.test_dataset(None)
    rows = {tuple(x.tolist()) for s in shards for x in s.tensors[0]}
    assert sum(len(s) for s in shards) + len(test) == 1797
    assert (
        len(rows & {tuple(x.tolist()) for x in test.tensors[0]}) < 10
    )  # digits has a few duplicate images


def test_linreg_shards_cover_the_data() -> None:
    task = LinReg({"samples": 100})
    shards = [task.train_dataset(Shard(i, 3, 0), None) for i in range(3)]
    assert [len(s) for s in shards] == [33, 33, 34]
    full = torch.cat([s.tensors[0] for s in shards])
    assert torch.equal(full, task._rows(0, 100)[0])


def data_for(name: str, root: Path) -> dict:
    """The parameters a task that reads files needs, with small files made for it."""
    rng = np.random.default_rng(0)
    if name == "images":
        x = rng.integers(0, 255, (40, 32, 32, 3)).astype(np.uint8)
        np.savez(root / "i.npz", x=x, y=rng.integers(0, 10, 40))
        return {"path": str(root / "i.npz"), "width": 4, "blocks": [1]}
    if name == "textlm":
        (root / "t.txt").write_text("the cat sat on the mat. " * 200)
        return {"path": str(root / "t.txt"), "context": 16, "width": 16, "heads": 2}
    if name == "tabular":
        rows = ["a,b,kind,y"] + [f"{i % 7},{i % 3},k{i % 2},{i * 0.5}" for i in range(60)]
        (root / "t.csv").write_text("\n".join(rows) + "\n")
        return {"path": str(root / "t.csv"), "target": "y"}
    return {}


@pytest.mark.parametrize("name", Plugins().tasks.names())
def test_task_conformance(name: str, tmp_path: Path) -> None:
    task = Plugins().tasks.get(name)(data_for(name, tmp_path))
    a, b = task.build_model(7), task.build_model(7)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
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


def test_synthetic_model_has_the_size_asked_random_and_reproducible() -> None:
    task = Synthetic({"params": 1001, "tensors": 4})
    model = task.build_model(seed=3)
    sizes = [p.numel() for p in model.parameters()]
    assert sum(sizes) == 1001 and len(sizes) == 4 and max(sizes) - min(sizes) <= 1
    flat = torch.cat([p.detach() for p in model.parameters()])
    assert flat.unique().numel() > 990  # random values, nothing a transport could deduplicate
    assert torch.equal(flat, torch.cat([p.detach() for p in task.build_model(seed=3).parameters()]))
    assert not torch.equal(
        flat, torch.cat([p.detach() for p in task.build_model(seed=4).parameters()])
    )


def test_synthetic_training_touches_every_parameter_and_stays_finite() -> None:
    task = Synthetic({"params": 100, "samples": 8})
    model = task.build_model(seed=0)
    data = task.train_dataset(Shard(1, 2, 0), None)
    assert len(data) == 8 and not torch.equal(
        data.tensors[0], task.train_dataset(Shard(0, 2, 0), None).tensors[0]
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        loss = task.loss(model, *data.tensors)
        loss.backward()
        assert all(p.grad is not None and bool((p.grad != 0).all()) for p in model.parameters())
        opt.step()
    assert math.isfinite(loss.item())
    assert "synthetic" in Plugins().tasks.names()


@pytest.mark.parametrize(
    "params",
    [{"params": 0}, {"tensors": 0}, {"params": 2, "tensors": 3}, {"samples": 0}, {"size": 5}],
)
def test_synthetic_refuses_bad_parameters(params: dict) -> None:
    with pytest.raises(JobSpecError, match="task synthetic"):
        Synthetic(params)


def test_digits_takes_any_partition_scheme() -> None:
    iid = [len(Digits({"partition": "iid"}).train_dataset(Shard(i, 4, 0), None)) for i in range(4)]
    assert max(iid) - min(iid) <= 1 and sum(iid) == 1797 - len(Digits({}).test_dataset(None))
    two = Digits({"partition": "pathological:2"}).train_dataset(Shard(0, 5, 0), None)
    assert len(torch.unique(two.tensors[1])) <= 4
    for params, words in (
        ({"alpha": 0.3, "partition": "iid"}, "give alpha or partition, not both"),
        ({"partition": "natural"}, "no natural key"),
        ({"partition": "zipf:1"}, "unknown partition"),
    ):
        with pytest.raises(JobSpecError, match=words):
            Digits(params)
