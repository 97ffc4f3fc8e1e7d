"""``digits``: classify scikit-learn's bundled 8x8 handwritten digits (1,797 images).

The data ships inside scikit-learn, so nothing is downloaded. A fixed stratified
part is held out for evaluation; the rest is split across the job's partitions by a
Dirichlet draw over class proportions (concentration ``alpha``; small = more
non-IID), or by any other scheme ``[task] partition`` names (``elastic.partitions``),
seeded by the job's seed so every worker computes the same split and takes part
``shard.index``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from elastic_plugins.tasks import check_fraction, seeded
from torch import nn
from torch.utils.data import TensorDataset

from elastic.api import (
    JobSpecError,
    Shard,
    Task,
    check_params,
    check_partition,
    hookimpl,
    partition,
)

__all__ = ["Digits"]


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise JobSpecError(
            "task digits needs scikit-learn; install it with: pip install 'elastic[examples]'"
        ) from exc
    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def _split(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices."""
    _, y = _load()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * test_fraction))
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train)), np.sort(np.array(test))


class Digits(Task):
    """A small MLP on the digits data.

    Parameters (``[task]``):
        alpha: Dirichlet concentration of the non-IID split (default 0.5).
        partition: how the training data is split among workers, any scheme of
            ``elastic.partitions`` (default ``"dirichlet:ALPHA"``).
        hidden: hidden units (default 64).
        test_fraction: share held out for evaluation (default 0.2).
    """

    name = "digits"

    def __init__(self, params: Mapping[str, Any]) -> None:
        p = check_params(
            "task digits",
            params,
            {"alpha": float, "hidden": int, "test_fraction": float, "partition": str},
        )
        self.alpha = p.get("alpha", 0.5)
        self.partition = p.get("partition", f"dirichlet:{self.alpha}")
        if "partition" in p and "alpha" in p:
            raise JobSpecError(
                "task digits: give alpha or partition, not both (alpha = A is partition = "
                '"dirichlet:A")'
            )
        if self.alpha <= 0:
            raise JobSpecError(f"task digits: alpha must be > 0, got {self.alpha}")
        check_partition(self.partition, "task digits")
        if self.partition == "natural":
            raise JobSpecError("task digits: its samples have no natural key; use another scheme")
        self.hidden = p.get("hidden", 64)
        self.test_fraction = p.get("test_fraction", 0.2)
        if self.hidden < 1:
            raise JobSpecError(f"task digits: hidden must be >= 1, got {self.hidden}")
        check_fraction("digits", self.test_fraction)
        super().__init__(p)

    def build_model(self, seed: int) -> nn.Module:
        return seeded(
            seed,
            lambda: nn.Sequential(
                nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10)
            ),
        )

    def train_dataset(self, shard: Shard, data_dir: Path | None) -> TensorDataset:
        x, y = _load()
        train, _ = _split(self.test_fraction, 0)
        parts = partition(y[train], shard.count, self.partition, shard.seed)
        idx = train[parts[shard.index % shard.count]]
        return TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))

    def global_train_dataset(self, data_dir: Path | None) -> TensorDataset:
        x, y = _load()
        train, _ = _split(self.test_fraction, 0)
        return TensorDataset(torch.from_numpy(x[train]), torch.from_numpy(y[train]))

    def test_dataset(self, data_dir: Path | None) -> TensorDataset:
        x, y = _load()
        _, test = _split(self.test_fraction, 0)
        return TensorDataset(torch.from_numpy(x[test]), torch.from_numpy(y[test]))

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(inputs), targets)

    def metrics(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, float]:
        return {"accuracy": float((model(inputs).argmax(dim=1) == targets).sum())}


@hookimpl
def elastic_tasks() -> list[type]:
    return [Digits]
