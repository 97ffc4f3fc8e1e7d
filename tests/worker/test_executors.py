"""The worker's executors: one for every mode a rule can ask for, chosen by the WORK."""

from __future__ import annotations

import torch

from elastic.plugins import Plugins
from elastic.wire.header import Message, MsgType
from elastic.worker.collective import CollectiveTraining
from elastic.worker.executors import EXECUTORS, GradientStep, LocalTraining
from elastic.worker.runner import TaskRunner


def test_every_installed_rule_has_an_executor_for_its_workers() -> None:
    modes = {mode for kind in (*EXECUTORS, CollectiveTraining) for mode in kind.modes}
    plugins = Plugins()
    asked = {plugins.aggregators.get(name).worker_mode for name in plugins.aggregators.names()}
    assert asked <= modes, asked - modes
    runner = TaskRunner(plugins, torch.device("cpu"), None, "w")
    assert (
        isinstance(runner.executors["train"], LocalTraining)
        and runner.executors["train"] is runner.executors["delta"]
    )
    assert isinstance(runner.executors["gradient"], GradientStep)


def test_a_mode_no_executor_serves_is_a_nack_naming_the_known_ones() -> None:
    work = Message(
        MsgType.WORK,
        job="j",
        round=1,
        key="w/j/1",
        meta={
            "mode": "edge",
            "task": "linreg",
            "task_params": {},
            "train": {},
            "shard": [0, 1],
            "seed": 0,
        },
    )
    reply = TaskRunner(Plugins(), torch.device("cpu"), None, "w").run(work).message
    assert reply.type is MsgType.NACK and reply.meta["reason"] == "work_failed"
    assert (
        reply.meta["detail"]
        == "unknown work mode 'edge'; this worker knows collective, delta, gradient, train"
    )


OWN_LOOP = '''
import torch
from elastic_plugins.tasks.linreg import LinReg

from elastic.api import TrainResult


class OwnLoop(LinReg):
    """Full-batch SGD in its own loop: the runtime's loop's result, by other code."""

    seen = []

    def train(self, model, dataset, ctx):
        type(self).seen.append(
            {
                "received": {k: v.clone() for k, v in ctx.received.items()},
                "before": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "ctx": ctx,
            }
        )
        x, y = dataset.tensors
        for epoch in range(ctx.params.local_epochs):
            ctx.check()
            model.zero_grad()
            loss = self.loss(model, x, y)
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= ctx.params.lr * p.grad
            ctx.report((epoch + 1) / ctx.params.local_epochs)
        return TrainResult(len(x), float(loss.detach()))


class Sloppy(LinReg):
    def train(self, model, dataset, ctx):
        return len(dataset), 0.5


class Figures(LinReg):
    def train(self, model, dataset, ctx):
        with ctx.autocast():
            loss = self.loss(model, *dataset.tensors)
        return TrainResult(len(dataset), loss, {"client": ctx.client, "half": torch.tensor(0.5)})


class BadFigures(LinReg):
    def train(self, model, dataset, ctx):
        return TrainResult(len(dataset), 0.5, {"nan": float("nan")})
'''


def test_a_task_that_owns_its_loop_is_given_its_context(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.worker.test_runner import expected, work

    (tmp_path / "own.py").write_text(OWN_LOOP)
    plugins = Plugins()
    ref = f"{tmp_path}/own.py:OwnLoop"
    task = plugins.task(ref)
    assert task.owns_training_loop() and not plugins.task("linreg").owns_training_loop()
    model = plugins.task("linreg")({"samples": 40, "features": 3}).build_model(3)
    runner = TaskRunner(plugins, torch.device("cpu"), None, "w")
    for mode in ("train", "delta"):
        msg = work(mode, model, round_=2)
        msg.meta["task"] = ref
        update = runner.run(msg).message
        assert update.type is MsgType.UPDATE, update.meta
        assert update.meta["num_samples"] == 20 and update.meta["loss"] > 0
        for name, want in expected(mode, model).items():  # the runtime loop's very result
            assert torch.allclose(update.tensors[name].to_tensor(), want, atol=1e-6), name
        seen = task.seen[-1]
        ctx = seen["ctx"]
        assert (ctx.device, ctx.round, ctx.params.lr, ctx.job) == (torch.device("cpu"), 2, 0.1, "j")
        assert ctx.seed == LocalTraining.seed(msg)
        for name, value in model.state_dict().items():  # what came, kept as it came
            assert torch.equal(seen["received"][name], value)
            assert torch.equal(seen["before"][name], value)


def run_task(task: str) -> Message:
    """What a worker answers to linreg's WORK with ``task`` in its place."""
    from tests.worker.test_runner import work

    plugins = Plugins()
    msg = work("train", plugins.task("linreg")({"samples": 40, "features": 3}).build_model(3))
    msg.meta["task"] = task
    return TaskRunner(plugins, torch.device("cpu"), None, "w").run(msg).message


def test_a_loop_that_returns_the_wrong_thing_is_a_nack_naming_the_fix(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "own.py").write_text(OWN_LOOP)
    nack = run_task(f"{tmp_path}/own.py:Sloppy")
    assert nack.type is MsgType.NACK and nack.meta["reason"] == "work_failed"
    assert (
        "Sloppy.train returned tuple; return TrainResult(num_samples, loss)"
        in (nack.meta["detail"])
    )


def test_a_task_that_does_not_load_is_a_nack_saying_where(tmp_path) -> None:  # type: ignore[no-untyped-def]
    nack = run_task(f"{tmp_path}/gone.py:Gone")
    assert nack.type is MsgType.NACK and nack.meta["reason"] == "task_unavailable"
    assert f"{tmp_path}/gone.py does not exist here" in nack.meta["detail"]


def test_a_loops_extra_figures_travel_checked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "own.py").write_text(OWN_LOOP)
    update = run_task(f"{tmp_path}/own.py:Figures")
    assert update.type is MsgType.UPDATE, update.meta
    assert update.meta["metrics"] == {"client": 0.0, "half": 0.5}  # the shard's index: 0
    nack = run_task(f"{tmp_path}/own.py:BadFigures")
    assert nack.type is MsgType.NACK and "metric 'nan'" in nack.meta["detail"]
