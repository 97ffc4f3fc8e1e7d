"""FedAvg (McMahan et al. 2017), with an optional server learning rate and momentum.

Workers train locally and send ``trained - sent`` weights. The server averages the
deltas weighted by sample counts and applies ``w += server_lr * step``, where
``step`` is the average delta, or with ``server_momentum`` β the momentum buffer
``m = β m + avg`` (FedAvgM, Hsu et al. 2019). ``server_lr = 1``, β = 0 is plain FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from elastic_plugins.averaging import WeightedSum

from elastic.api import Aggregator, Update, check_params
from elastic.errors import JobSpecError
from elastic.hookspecs import hookimpl
from elastic.training import update_template

__all__ = ["FedAvg"]


class FedAvg(Aggregator):
    """Sample-weighted averaging of model deltas.

    Parameters (``[rule]``):
        server_lr: scale of the averaged delta (default 1.0).
        server_momentum: server momentum β in [0, 1) (default 0.0).
        weighting: ``"samples"`` (default) or ``"uniform"``.
    """

    name = "fedavg"
    worker_mode = "train"

    def __init__(self, params: Mapping[str, Any]) -> None:
        p = check_params(
            "rule fedavg", params, {"server_lr": float, "server_momentum": float, "weighting": str}
        )
        self.server_lr = p.get("server_lr", 1.0)
        self.momentum = p.get("server_momentum", 0.0)
        self.weighting = p.get("weighting", "samples")
        if self.server_lr <= 0:
            raise JobSpecError(f"rule fedavg: server_lr must be > 0, got {self.server_lr}")
        if not 0 <= self.momentum < 1:
            raise JobSpecError(f"rule fedavg: server_momentum must be in [0, 1), got {self.momentum}")
        if self.weighting not in ("samples", "uniform"):
            raise JobSpecError(f'rule fedavg: weighting must be "samples" or "uniform", got {self.weighting!r}')
        super().__init__(p)
        self._velocity: dict[str, torch.Tensor] = {}

    def setup(self, model: torch.nn.Module) -> None:
        self._targets = update_template(model, "train")
        self._sum = WeightedSum(self._targets)

    def begin_round(self) -> None:
        self._sum.reset()

    def accumulate(self, update: Update) -> None:
        weight = 1.0 if self.weighting == "uniform" else float(update.num_samples)
        self._sum.add(update.tensors, weight)

    def finalize(self) -> None:
        if self._sum.total_weight <= 0:
            return  # every update came from an empty shard: nothing to learn from
        inv = 1.0 / self._sum.total_weight
        with torch.no_grad():
            for name, acc in self._sum.sums.items():  # acc * inv is the mean delta
                if not self.momentum:  # one fused pass: w += lr * mean
                    self._targets[name].add_(acc, alpha=self.server_lr * inv)
                    continue
                v = self._velocity.get(name)
                if v is None:
                    v = self._velocity[name] = acc * inv
                else:
                    v.mul_(self.momentum).add_(acc, alpha=inv)
                self._targets[name].add_(v, alpha=self.server_lr)
        self._sum.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": dict(self._velocity)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._velocity = dict(state.get("velocity", {}))


@hookimpl
def elastic_aggregators() -> dict[str, type]:
    return {"fedavg": FedAvg}
