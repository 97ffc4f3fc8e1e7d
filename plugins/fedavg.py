"""FedAvg (McMahan et al. 2017), with an optional server learning rate and momentum.

Workers train locally and send their trained weights. The server averages them
weighted by sample counts; the step is ``avg - w`` (the mean delta), applied as
``w += server_lr * step``, or with ``server_momentum`` β through the momentum buffer
``m = β m + step`` (FedAvgM, Hsu et al. 2019). ``server_lr = 1``, β = 0 is plain
FedAvg: the new model is the weighted mean, written in one pass.
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
    """Sample-weighted averaging of trained weights.

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
        total, lr = self._sum.total_weight, self.server_lr
        with torch.no_grad():
            for name, acc in self._sum.sums.items():
                w = self._targets[name]
                if not self.momentum and lr == 1.0:  # plain FedAvg: w = mean, one pass
                    torch.div(acc, total, out=w.view(acc.shape))
                    continue
                step = acc.div_(total).sub_(w.view(acc.shape))  # mean weights - w = mean delta
                if self.momentum:
                    v = self._velocity.get(name)
                    if v is None:
                        v = self._velocity[name] = step.clone()
                    else:
                        v.mul_(self.momentum).add_(step)
                    step = v
                w.add_(step.view(w.shape), alpha=lr)
        self._sum.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": dict(self._velocity)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._velocity = dict(state.get("velocity", {}))


@hookimpl
def elastic_aggregators() -> dict[str, type]:
    return {"fedavg": FedAvg}
