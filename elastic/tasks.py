"""The training problem a plugin implements (``Task``), and the ``Shard`` of data a
worker trains on. Plugins import these from ``elastic.api``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

__all__ = ["Task", "Shard"]


@dataclass(frozen=True)
class Shard:
    """Which part of a task's data a worker trains on: part ``index`` of ``count``.

    ``seed`` is the job's seed; a task splits its data the same way on every worker
    from it, so the parts are disjoint and together cover the data.
    """

    index: int
    count: int
    seed: int = 0


class Task(ABC):
    """A training problem: the model, the data, the loss and the evaluation.

    The worker runtime owns the training loop (epochs, batches, optimizer), so a task
    only says *what* to train. It is built from the job spec's ``[task]`` table on the
    coordinator (to build and evaluate the global model) and on every worker.

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

    @abstractmethod
    def loss(
        self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """The mean loss of ``model`` on one batch (a scalar with a graph)."""

    def metrics(
        self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, float]:
        """Extra evaluation figures on one batch, as sums over its samples.

        The runtime adds them up over the test set and divides by its size. The
        default adds nothing; a classifier returns e.g. ``{"accuracy": correct}``.
        """
        return {}
