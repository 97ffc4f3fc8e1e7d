"""``tabular``: classification or regression on a CSV file with a header row.

``[task] path`` is the file (absolute, or under the worker's ``--data``), ``target``
the column to predict. Every other column is a feature: a column whose values all
read as numbers is numeric (standardised, a missing value made the column's mean),
any other is categorical (one-hot over the values the file holds). ``kind`` is
``"classification"`` or ``"regression"``, or ``"auto"``: classification when the
target is text, or whole numbers with at most 20 values. Regression is trained on
the standardised target and reports ``rmse`` in the target's own units.

The training rows are split among clients by ``partition``; ``"natural"`` splits by
the values of ``natural_key`` (a column such as a site or a hospital, then not a
feature): each client holds the rows of some sites, no site split between clients.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from elastic_plugins.tasks import (
    check_fraction,
    check_split,
    client_rows,
    data_file,
    held_out,
    seeded,
)
from torch import nn
from torch.utils.data import TensorDataset

from elastic.api import (
    JobSpecError,
    Shard,
    Task,
    check_params,
    hookimpl,
)

__all__ = ["Tabular"]

MAX_CLASSES_AUTO = 20  # whole-number targets with at most this many values are classes


@dataclass(frozen=True)
class Table:
    """A CSV made numeric: features, targets (class indices or standardised values),
    the natural keys, and what undoes the target's scaling."""

    x: np.ndarray
    y: np.ndarray
    keys: np.ndarray
    train: np.ndarray
    test: np.ndarray
    classes: int  # 0 for regression
    target_scale: float


class Tabular(Task):
    """An MLP on a table.

    Parameters (``[task]``):
        path: the CSV file (required); target: the column to predict (required).
        kind: "auto" (default), "classification" or "regression".
        hidden: hidden layer widths (default [64, 64]).
        partition: any scheme of ``elastic.partitions`` (default "iid"; Dirichlet and
            pathological need classes); natural_key: the column "natural" splits by.
        exclude: columns that are not features (e.g. an id).
        test_fraction: rows held out for evaluation (default 0.2).
    """

    name = "tabular"

    def __init__(self, params: Mapping[str, Any]) -> None:
        p = check_params(
            "task tabular",
            params,
            {
                "path": str,
                "target": str,
                "kind": str,
                "hidden": list,
                "partition": str,
                "natural_key": str,
                "exclude": list,
                "test_fraction": float,
            },
        )
        for key, example in (("path", "sites.csv"), ("target", "price")):
            if key not in p:
                raise JobSpecError(
                    f'task tabular: [task] {key} is missing; e.g. {key} = "{example}"'
                )
        self.path, self.target = p["path"], p["target"]
        self.kind = p.get("kind", "auto")
        self.hidden = tuple(p.get("hidden", [64, 64]))
        self.partition = p.get("partition", "iid")
        self.natural_key = p.get("natural_key", "")
        self.exclude = tuple(p.get("exclude", []))
        self.test_fraction = p.get("test_fraction", 0.2)
        if self.kind not in ("auto", "classification", "regression"):
            raise JobSpecError(
                f'task tabular: kind = {self.kind!r}; use "auto", "classification" or "regression"'
            )
        if not all(isinstance(h, int) and h >= 1 for h in self.hidden):
            raise JobSpecError(
                f"task tabular: hidden = {list(self.hidden)}; give widths, e.g. [64, 64]"
            )
        check_split(self.partition, "tabular")
        if (self.partition == "natural") != bool(self.natural_key):
            raise JobSpecError(
                'task tabular: partition = "natural" splits by natural_key (a column); give both '
                "or neither"
            )
        check_fraction("tabular", self.test_fraction)
        self._inputs = self._outputs = 0  # the model's sizes and the target's scale: from the file
        self._scale = 1.0
        super().__init__(p)

    def _table(self, data_dir: Path | None) -> Table:
        where = data_file("tabular", self.path, data_dir)
        table = _read(
            str(where), self.target, self.kind, self.natural_key, self.exclude, self.test_fraction
        )
        self._inputs, self._outputs = table.x.shape[1], table.classes or 1
        self._scale = table.target_scale
        return table

    def build_model(self, seed: int) -> nn.Module:
        if not self._inputs:  # the sizes come from the file (the coordinator's copy of it)
            self._table(None)
        return seeded(seed, self._mlp)

    def _mlp(self) -> nn.Module:
        layers: list[nn.Module] = []
        width = self._inputs
        for hidden in self.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        return nn.Sequential(*layers, nn.Linear(width, self._outputs))

    def train_dataset(self, shard: Shard, data_dir: Path | None) -> TensorDataset:
        table = self._table(data_dir)
        labels = table.y[table.train] if table.classes else np.zeros(len(table.train), np.int64)
        keys = table.keys[table.train] if self.natural_key else None
        idx = table.train[client_rows(labels, shard, self.partition, keys)]
        return self._rows(table, idx)

    def test_dataset(self, data_dir: Path | None) -> TensorDataset:
        table = self._table(data_dir)
        return self._rows(table, table.test)

    def global_train_dataset(self, data_dir: Path | None) -> TensorDataset:
        table = self._table(data_dir)
        return self._rows(table, table.train)

    @staticmethod
    def _rows(table: Table, idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(table.x[idx]), torch.from_numpy(table.y[idx]))

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = model(inputs)
        if self._outputs > 1:
            return nn.functional.cross_entropy(out, targets)
        return nn.functional.mse_loss(out.squeeze(1), targets)

    def metrics(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, float]:
        out = model(inputs)
        if self._outputs > 1:
            return {"accuracy": float((out.argmax(dim=1) == targets).sum())}
        errors = (out.squeeze(1) - targets) * self._scale  # in the target's own units
        return {"mse": float((errors**2).sum())}

    def derived_metrics(self, figures: Mapping[str, float]) -> dict[str, float]:
        return {"rmse": math.sqrt(figures["mse"])} if "mse" in figures else {}


@lru_cache(maxsize=2)
def _read(
    path: str,
    target: str,
    kind: str,
    natural_key: str,
    exclude: tuple[str, ...],
    test_fraction: float,
) -> Table:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if len(rows) < 3:
        raise JobSpecError(f"task tabular: {path} needs a header row and at least two rows")
    header, body = rows[0], rows[1:]
    for name in (target, natural_key, *exclude):
        if name and name not in header:
            raise JobSpecError(
                f"task tabular: {path} has no column {name!r} (its columns: {', '.join(header)})"
            )
    if any(len(r) != len(header) for r in body):
        bad = next(i for i, r in enumerate(body, 2) if len(r) != len(header))
        raise JobSpecError(f"task tabular: {path} line {bad} has not {len(header)} fields")
    columns = {name: [r[i].strip() for r in body] for i, name in enumerate(header)}
    train, test = held_out(len(body), test_fraction)

    values = columns[target]
    numeric = _numbers(values)
    if kind == "auto":
        whole = numeric is not None and bool(np.all(np.mod(numeric, 1) == 0))
        kind = (
            "regression"
            if numeric is not None and not (whole and len(set(values)) <= MAX_CLASSES_AUTO)
            else "classification"
        )
    if kind == "classification":
        names = sorted(set(values), key=lambda v: (float(v), v) if numeric is not None else (0, v))
        y = np.array([names.index(v) for v in values], dtype=np.int64)
        classes, scale = len(names), 1.0
        if classes < 2:
            raise JobSpecError(f"task tabular: target {target!r} has one value; nothing to learn")
    else:
        if numeric is None or np.isnan(numeric).any():
            raise JobSpecError(f"task tabular: regression target {target!r} has non-numbers")
        mean, scale = float(numeric[train].mean()), float(numeric[train].std() or 1.0)
        y = ((numeric - mean) / scale).astype(np.float32)
        classes = 0

    features = []
    for name in header:
        if name in (target, natural_key, *exclude):
            continue
        col = _numbers(columns[name])
        if col is not None:
            fill = float(np.nanmean(col[train])) if not np.isnan(col[train]).all() else 0.0
            col = np.where(np.isnan(col), fill, col)
            std = float(col[train].std()) or 1.0
            features.append(((col - float(col[train].mean())) / std)[:, None])
        else:  # categorical: one-hot over the values seen
            cats = sorted(set(columns[name]))
            index = {c: i for i, c in enumerate(cats)}
            onehot = np.zeros((len(body), len(cats)))
            onehot[np.arange(len(body)), [index[v] for v in columns[name]]] = 1.0
            features.append(onehot)
    if not features:
        raise JobSpecError(f"task tabular: {path} has no feature column besides {target!r}")
    x = np.concatenate(features, axis=1).astype(np.float32)
    keys = np.array(columns[natural_key]) if natural_key else np.zeros(len(body))
    return Table(x, y, keys, train, test, classes, scale)


def _numbers(values: list[str]) -> np.ndarray | None:
    """The column as floats (empty = NaN), or None when any value is not a number."""
    try:
        return np.array([float(v) if v else math.nan for v in values], dtype=np.float64)
    except ValueError:
        return None


@hookimpl
def elastic_tasks() -> list[type]:
    return [Tabular]
