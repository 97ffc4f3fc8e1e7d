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
from elastic_plugins.averaging import MeanDeltaRule

from elastic.api import JobSpecError, hookimpl

__all__ = ["FedAvg"]


class FedAvg(MeanDeltaRule):
    """Sample-weighted averaging of trained weights.

    Parameters (``[rule]``):
        server_lr: scale of the averaged delta (default 1.0).
        server_momentum: server momentum β in [0, 1) (default 0.0).
        weighting: ``"samples"`` (default) or ``"uniform"``.
    """

    name = "fedavg"

    def __init__(self, params: Mapping[str, Any]) -> None:
        p = self.check("rule fedavg", params, {"server_lr": float, "server_momentum": float})
        self.server_lr = p.get("server_lr", 1.0)
        self.momentum = p.get("server_momentum", 0.0)
        if self.server_lr <= 0:
            raise JobSpecError(f"rule fedavg: server_lr must be > 0, got {self.server_lr}")
        if not 0 <= self.momentum < 1:
            raise JobSpecError(
                f"rule fedavg: server_momentum must be in [0, 1), got {self.momentum}"
            )
        self._velocity: dict[str, torch.Tensor] = {}

    @property
    def plain(self) -> bool:
        return not self.momentum and self.server_lr == 1.0

    def apply_step(self, name: str, w: torch.Tensor, step: torch.Tensor) -> None:
        if self.momentum:
            v = self._velocity.get(name)
            if v is None:
                v = self._velocity[name] = step.clone()
            else:
                v.mul_(self.momentum).add_(step)
            step = v
        w.add_(step.view(w.shape), alpha=self.server_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": dict(self._velocity)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._velocity = {k: t.clone() for k, t in state.get("velocity", {}).items()}


@hookimpl
def elastic_aggregators() -> list[type]:
    return [FedAvg]
