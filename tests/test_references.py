"""Tasks and rules by import path: a module on the import path, or a file beside the
job spec; each failure is one error naming the reference, the host and the fix."""

from __future__ import annotations

import socket
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from elastic.coordinator.job import check_spec
from elastic.errors import JobSpecError, PluginError
from elastic.jobspec import load_job_spec, parse_job_spec
from elastic.plugins import Plugins
from elastic.references import absolute_reference

TASK = textwrap.dedent(
    """
    import torch
    from torch.utils.data import TensorDataset

    from elastic.api import Task, TrainResult


    class Line(Task):
        def build_model(self, seed):
            torch.manual_seed(seed)
            return torch.nn.Linear(2, 1)

        def train_dataset(self, shard, data_dir):
            g = torch.Generator().manual_seed(shard.index)
            x = torch.randn(16, 2, generator=g)
            return TensorDataset(x, x.sum(dim=1, keepdim=True))

        def test_dataset(self, data_dir):
            return TensorDataset(torch.ones(4, 2), torch.full((4, 1), 2.0))

        def loss(self, model, inputs, targets):
            return torch.nn.functional.mse_loss(model(inputs), targets)


    class LineLoop(Line):
        # The same problem in a loop of its own: shuffled mini-batches, plain SGD,
        # a pull toward the received weights when [train] prox_mu asks for one.

        def train(self, model, dataset, ctx):
            x, y = dataset.tensors
            g = torch.Generator().manual_seed(ctx.seed)
            mu = ctx.params.prox_mu
            for epoch in range(ctx.params.local_epochs):
                order = torch.randperm(len(x), generator=g)
                for start in range(0, len(x), ctx.params.batch_size or len(x)):
                    ctx.check()
                    idx = order[start : start + (ctx.params.batch_size or len(x))]
                    model.zero_grad()
                    loss = self.loss(model, x[idx], y[idx])
                    for name, p in model.named_parameters():
                        loss = loss + mu / 2 * (p - ctx.received[name]).pow(2).sum()
                    loss.backward()
                    with torch.no_grad():
                        for p in model.parameters():
                            p -= ctx.params.lr * p.grad
                ctx.report((epoch + 1) / ctx.params.local_epochs)
            return TrainResult(len(x), loss.detach())


    NOT_A_TASK = 3
    """
)

RULE = textwrap.dedent(
    """
    from elastic_plugins.fedavg import FedAvg


    class Halved(FedAvg):
        name = "halved"
    """
)


def spec(task: str, rule: str = "fedavg") -> dict:
    return {"job": {"id": "j", "task": task, "rule": rule, "rounds": 1}}


@pytest.fixture
def plugins() -> Plugins:
    return Plugins()


def test_a_task_from_a_file_beside_the_job(tmp_path: Path, plugins: Plugins) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "line.py").write_text(TASK)
    (tmp_path / "mine" / "job.toml").write_text(
        '[job]\ntask = "./line.py:Line"\nrule = "fedavg"\nrounds = 1\n'
    )
    job = load_job_spec(tmp_path / "mine" / "job.toml")
    assert job.task == f"{tmp_path / 'mine' / 'line.py'}:Line"  # absolute: one path everywhere
    cls = plugins.task(job.task)
    assert cls.__name__ == "Line" and plugins.task(job.task) is cls  # loaded once
    assert isinstance(cls({}).build_model(0), torch.nn.Linear)
    check_spec(job, plugins)  # what `elastic validate` does


def test_a_task_and_a_rule_from_modules(
    tmp_path: Path, plugins: Plugins, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "team_tasks.py").write_text(TASK)
    (tmp_path / "team_rules.py").write_text(RULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    job = parse_job_spec(spec("team_tasks:Line", "team_rules:Halved"))
    assert (job.task, job.rule) == ("team_tasks:Line", "team_rules:Halved")
    assert plugins.task(job.task).__name__ == "Line"
    assert plugins.rule(job.rule).__name__ == "Halved"
    check_spec(job, plugins)
    for name in ("team_tasks", "team_rules"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("ref", "words"),
    [
        ("/nowhere/line.py:Line", ["/nowhere/line.py does not exist here", "every host"]),
        ("no_such_module_xyz:Line", ["no module 'no_such_module_xyz'", "PYTHONPATH"]),
        ("{dir}/line.py:Missing", ["has no 'Missing'", "check the class name"]),
        ("{dir}/line.py:NOT_A_TASK", ["NOT_A_TASK does not extend Task", "class NOT_A_TASK"]),
        ("{dir}/broken.py:Line", ["broken.py failed to import: ZeroDivisionError"]),
        ("{dir}/line.py:", ["is not a class reference", "MODULE:CLASS"]),
    ],
)
def test_what_cannot_load_says_what_where_and_the_fix(
    tmp_path: Path, plugins: Plugins, ref: str, words: list[str]
) -> None:
    (tmp_path / "line.py").write_text(TASK)
    (tmp_path / "broken.py").write_text("1 / 0\n")
    ref = ref.format(dir=tmp_path)
    with pytest.raises(PluginError) as err:
        plugins.task(ref)
    message = str(err.value)
    assert f"cannot load task {ref!r} on {socket.gethostname()}" in message or (
        "is not a class reference" in message
    )
    for word in words:
        assert word in message, message


def test_a_rule_must_be_an_aggregator(tmp_path: Path, plugins: Plugins) -> None:
    (tmp_path / "line.py").write_text(TASK)
    with pytest.raises(PluginError, match="Line does not extend Aggregator"):
        plugins.rule(f"{tmp_path}/line.py:Line")


def test_a_relative_file_needs_a_job_file() -> None:
    with pytest.raises(JobSpecError, match="relative path with no job file"):
        parse_job_spec(spec("./line.py:Line"))
    assert absolute_reference("digits", Path("/x")) == "digits"
    assert absolute_reference("pkg.mod:C", Path("/x")) == "pkg.mod:C"
    assert absolute_reference("sub/t.py:C", Path("/x")) == "/x/sub/t.py:C"
    assert absolute_reference("/abs/t.py:C", Path("/x")) == "/abs/t.py:C"
