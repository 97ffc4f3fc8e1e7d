"""Byzantine-robust rules: coordinate-wise median, trimmed mean, Krum and Multi-Krum.

Each works on the round's deltas (a worker's trained weights minus the global
model) and steps the model by a robust aggregate of them instead of their mean, so
that a few workers sending anything at all cannot drag the model where they like.

Unlike FedAvg these cannot fold an update in and forget it: a median needs every
value at once. They keep the round's deltas, flattened, so their memory is
O(participants x model): the price of robustness, paid only by jobs that ask for it.

* ``median``: the coordinate-wise median (Yin et al. 2018).
* ``trimmed_mean``: per coordinate, drop the ``beta`` share of largest and of smallest
  values, average the rest (Yin et al. 2018).
* ``krum``: the one delta closest to its ``n - f - 2`` nearest others, for up to
  ``f`` Byzantine workers (Blanchard et al. 2017); ``multikrum`` averages the ``m``
  best-scored ones.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from elastic.api import Aggregator, JobSpecError, Update, check_params, hookimpl, update_template

__all__ = ["Median", "TrimmedMean", "Krum", "MultiKrum"]


class _Robust(Aggregator):
    """Collects the round's deltas as rows of one matrix; ``combine`` makes the step."""

    worker_mode = "train"

    def setup(self, model: torch.nn.Module) -> None:
        self._targets = update_template(model, "train")
        self._rows: list[torch.Tensor] = []

    def begin_round(self) -> None:
        self._rows = []

    def accumulate(self, update: Update) -> None:
        parts = []
        for name, w in self._targets.items():
            trained = update.tensors[name].to_tensor().reshape(-1).to(torch.float32)
            parts.append(trained - w.detach().reshape(-1).to(torch.float32))
        self._rows.append(torch.cat(parts))

    def finalize(self) -> None:
        if not self._rows:
            return
        step = self.combine(torch.stack(self._rows))
        offset = 0
        with torch.no_grad():
            for w in self._targets.values():
                n = w.numel()
                w.add_(step[offset : offset + n].view(w.shape).to(w.dtype))
                offset += n
        self._rows = []

    @abstractmethod
    def combine(self, deltas: torch.Tensor) -> torch.Tensor:
        """The step from a (participants x parameters) matrix of deltas."""


class Median(_Robust):
    """Coordinate-wise median of the deltas (no parameters)."""

    name = "median"

    def __init__(self, params: Mapping[str, Any]) -> None:
        super().__init__(check_params("rule median", params, {}))

    def combine(self, deltas: torch.Tensor) -> torch.Tensor:
        return deltas.quantile(0.5, dim=0) if deltas.shape[0] > 1 else deltas[0]


class TrimmedMean(_Robust):
    """Coordinate-wise mean after dropping the ``beta`` share of the largest and the
    smallest values (``[rule] beta``, in [0, 0.5), default 0.1)."""

    name = "trimmed_mean"

    def __init__(self, params: Mapping[str, Any]) -> None:
        p = check_params("rule trimmed_mean", params, {"beta": float})
        self.beta = p.get("beta", 0.1)
        if not 0 <= self.beta < 0.5:
            raise JobSpecError(f"rule trimmed_mean: beta must be in [0, 0.5), got {self.beta}")
        super().__init__(p)

    def combine(self, deltas: torch.Tensor) -> torch.Tensor:
        n = deltas.shape[0]
        cut = min(math.floor(self.beta * n), (n - 1) // 2)
        ordered = deltas.sort(dim=0).values
        return ordered[cut : n - cut].mean(dim=0)


class MultiKrum(_Robust):
    """The mean of the ``m`` deltas with the best Krum scores (``[rule] f``: how many
    workers may be Byzantine, default 1; ``m``: how many deltas to keep, default
    ``n - f``). With fewer than ``f + 3`` deltas the scores mean nothing: it keeps all."""

    name = "multikrum"

    def __init__(self, params: Mapping[str, Any]) -> None:
        p = check_params(f"rule {self.name}", params, {"f": int, "m": int})
        self.f = p.get("f", 1)
        self.m: int | None = p.get("m")
        if self.f < 0:
            raise JobSpecError(f"rule {self.name}: f must be >= 0, got {self.f}")
        if self.m is not None and self.m < 1:
            raise JobSpecError(f"rule {self.name}: m must be >= 1, got {self.m}")
        super().__init__(p)

    def keep(self, n: int) -> int:
        return min(n, self.m if self.m is not None else n - self.f)

    def combine(self, deltas: torch.Tensor) -> torch.Tensor:
        n = deltas.shape[0]
        if n < self.f + 3:
            return deltas.mean(dim=0)
        distances = torch.cdist(deltas, deltas).pow(2)
        nearest = distances.sort(dim=1).values[:, 1 : n - self.f - 1]  # skip the distance to itself
        chosen = nearest.sum(dim=1).argsort()[: max(self.keep(n), 1)]
        return deltas[chosen].mean(dim=0)


class Krum(MultiKrum):
    """The single delta with the best Krum score (``[rule] f``, default 1)."""

    name = "krum"

    def __init__(self, params: Mapping[str, Any]) -> None:
        if "m" in params:
            raise JobSpecError("rule krum keeps one delta; use rule multikrum to set m")
        super().__init__(params)

    def keep(self, n: int) -> int:
        return 1


@hookimpl
def elastic_aggregators() -> list[type]:
    return [Median, TrimmedMean, Krum, MultiKrum]
