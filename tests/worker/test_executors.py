"""The worker's executors: one for every mode a rule can ask for, chosen by the WORK."""

from __future__ import annotations

import torch

from elastic.plugins import Plugins
from elastic.wire.header import Message, MsgType
from elastic.worker.executors import EXECUTORS, GradientStep, LocalTraining
from elastic.worker.runner import TaskRunner


def test_every_installed_rule_has_an_executor_for_its_workers() -> None:
    modes = {mode for kind in EXECUTORS for mode in kind.modes}
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
            "mode": "collective",
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
        == "unknown work mode 'collective'; this worker knows delta, gradient, train"
    )
