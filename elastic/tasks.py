"""The training problem a plugin implements (``Task``), the ``Shard`` of data a
worker trains on, and what a task that owns its training loop is given
(``TrainContext``) and returns (``TrainResult``). Plugins import these from
``elastic.api``."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

from elastic.errors import Cancelled, JobSpecError
from elastic.jobspec import TrainParams
from elastic.precision import autocast

__all__ = ["Task", "Shard", "TrainContext", "TrainResult", "task_of"]

log = logging.getLogger("elastic.tasks")


@dataclass(frozen=True)
class Shard:
    """Which part of a task's data a worker trains on: part ``index`` of ``count``.

    ``seed`` is the job's seed; a task splits its data the same way on every worker
    from it, so the parts are disjoint and together cover the data.
    """

    index: int
    count: int
    seed: int = 0


MAX_TRAIN_METRICS = 16  # the extra figures a loop may report per update


def is_train_metric(name: object, value: object) -> bool:
    """Whether ``name: value`` is a training figure an update may carry: a name of at
    most 64 characters and a finite number."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 64
        and not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
    )


@dataclass
class TrainResult:
    """What a round of local training gives: the samples it learnt from (the update's
    weight in FedAvg), the mean training loss of its last epoch, and any other
    figures (``metrics``: name -> number, e.g. ``{"accuracy": 0.93}``), which the
    round's history shows averaged over its clients, weighted by their samples, as
    ``train_<name>``."""

    num_samples: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainContext:
    """What ``Task.train`` (a task's own training loop) is given besides the model
    and its data.

    Attributes:
        device: where the model and the batches go.
        params: the job's ``[train]`` table (``lr``, ``local_epochs``, ``batch_size``,
            ``prox_mu``, ``precision``, ...), for the loop to use as it sees fit
            (``autocast()`` is the forward pass's context for ``precision``).
        received: the global weights this round started from, by state-dict name (a
            copy: training leaves it as it was), for proximal terms and control
            variates.
        seed: this worker's seed for this round (the job's, the round's and the
            shard's): shuffle with it and runs are reproducible.
        round: the round number.
        client: the data part trained on (``Shard.index``): the worker's, or with
            virtual clients (``[job] clients``) the client's; for state a task keeps
            per client.
    """

    device: torch.device
    params: TrainParams
    received: Mapping[str, torch.Tensor]
    seed: int
    round: int
    cancel: threading.Event | None = None
    job: str = ""
    client: int = 0
    _reported: int = field(default=-1, repr=False)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's context for ``[train] precision`` (autocast to bf16
        or fp16 on ``device``; nothing for fp32): ``with ctx.autocast(): loss = ...``."""
        return autocast(self.device, self.params.precision)

    def cancelled(self) -> bool:
        """True once the worker is stopping: return (or call ``check``) soon."""
        return self.cancel is not None and self.cancel.is_set()

    def check(self) -> None:
        """Raise ``Cancelled`` once the worker is stopping; call it between batches."""
        if self.cancelled():
            raise Cancelled("training stopped: the worker is shutting down")

    def report(self, done: float) -> None:
        """How far the loop is (0 to 1); the worker logs each tenth reached."""
        tenth = int(max(0.0, min(1.0, done)) * 10)
        if tenth > self._reported:
            self._reported = tenth
            log.info("training job=%s round=%d done=%d%%", self.job, self.round, tenth * 10)


class Task(ABC):
    """A training problem: the model, the data, the loss and the evaluation.

    By default the worker runtime owns the training loop (epochs, batches,
    optimizer, FedProx's proximal term), so a task only says *what* to train; a task
    that overrides ``train`` owns its loop instead. It is built from the job spec's
    ``[task]`` table on the coordinator (to build and evaluate the global model) and
    on every worker.

    Class attributes:
        name: the name a job spec uses to pick this task.
    """

    name: ClassVar[str]

    def __init__(self, params: Mapping[str, Any]) -> None:
        """Validate ``params`` (the job spec's ``[task]`` table); raise ``JobSpecError``."""
        self.params = dict(params)

    @abstractmethod
    def build_model(self, seed: int) -> torch.nn.Module:
        """A freshly initialised model; the same ``seed`` must give the same weights."""

    @abstractmethod
    def train_dataset(self, shard: Shard, data_dir: Path | None) -> Dataset:
        """This worker's part of the training data; items are ``(inputs, targets)``.

        ``data_dir`` is the worker's ``--data`` directory, or None when it has none.
        """

    @abstractmethod
    def test_dataset(self, data_dir: Path | None) -> Dataset:
        """The held-out evaluation data (used by the coordinator)."""

    def derived_metrics(self, figures: Mapping[str, float]) -> dict[str, float]:
        """Figures computed from an evaluation's means (``eval_loss`` and the
        ``metrics`` averages), for those that are no mean of per-sample figures:
        ``{"perplexity": math.exp(figures["eval_loss"])}``. The default adds none."""
        return {}

    def global_train_dataset(self, data_dir: Path | None) -> Dataset | None:
        """Training data (all of it, or a fixed sample) the coordinator evaluates the
        global model on at each evaluation: the history's ``global_train_loss``, the
        objective federated training minimises (the history's ``loss`` is the
        clients' own, during their local epochs). None (the default): not measured.
        """
        return None

    @abstractmethod
    def loss(
        self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """The mean loss of ``model`` on one batch (a scalar with a graph)."""

    def train(self, model: torch.nn.Module, dataset: Dataset, ctx: TrainContext) -> TrainResult:
        """Train ``model`` in place on ``dataset`` (this worker's shard) for one round
        and say on how many samples, with what loss; override it to own the loop.

        Not overridden, the runtime's loop runs instead: ``[train] local_epochs`` of
        ``batch_size`` batches with the job's optimizer, and ``prox_mu``. An override
        gets the received weights, the device, the ``[train]`` table, a seed and a
        cancellation check in ``ctx`` (``TrainContext``); the weights it leaves in
        ``model`` are the update (the rule decides whether as weights or a change).
        """
        raise NotImplementedError("the runtime's training loop runs for this task")

    @classmethod
    def owns_training_loop(cls) -> bool:
        """Whether this task overrides ``train``."""
        return cls.train is not Task.train

    def metrics(
        self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, float]:
        """Extra evaluation figures on one batch, as sums over its samples.

        The runtime adds them up over the test set and divides by its size. The
        default adds nothing; a classifier returns e.g. ``{"accuracy": correct}``.
        """
        return {}


def task_of(
    model: Callable[[int], torch.nn.Module],
    data: Callable[[Shard, Path | None], Dataset],
    test_data: Callable[[Path | None], Dataset],
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    train: Callable[[torch.nn.Module, Dataset, TrainContext], TrainResult] | None = None,
    metrics: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], dict[str, float]]
    | None = None,
) -> type[Task]:
    """A task made of functions, for the simplest case: a file of functions and one
    line, ``MyTask = task_of(model=..., data=..., test_data=..., loss=...)``, named in
    the job as ``task = "./my_file.py:MyTask"``.

    Each function is the ``Task`` method of its name without ``self``: ``model(seed)``
    is ``build_model``, ``data(shard, data_dir)`` is ``train_dataset``,
    ``test_data(data_dir)`` is ``test_dataset``; ``loss``, and optionally ``train``
    (a loop of its own) and ``metrics``, as on ``Task``. The task takes no ``[task]``
    parameters.
    """
    for name, fn in (("model", model), ("data", data), ("test_data", test_data), ("loss", loss)):
        if not callable(fn):
            raise TypeError(f"task_of: {name} must be a function, got {type(fn).__name__}")

    def __init__(self: Task, params: Mapping[str, Any]) -> None:
        if params:
            raise JobSpecError(
                f"a task of functions takes no [task] parameters, got {sorted(params)}; drop "
                "them, or write a Task class that reads them"
            )
        Task.__init__(self, params)

    methods: dict[str, Any] = {
        "__init__": __init__,
        "build_model": lambda self, seed: model(seed),
        "train_dataset": lambda self, shard, data_dir: data(shard, data_dir),
        "test_dataset": lambda self, data_dir: test_data(data_dir),
        "loss": lambda self, m, inputs, targets: loss(m, inputs, targets),
        "__doc__": f"A task of functions ({getattr(model, '__module__', '?')}).",
    }
    if train is not None:
        methods["train"] = lambda self, m, dataset, ctx: train(m, dataset, ctx)
    if metrics is not None:
        methods["metrics"] = lambda self, m, inputs, targets: metrics(m, inputs, targets)
    return type("FunctionTask", (Task,), methods)
