"""Synchronous data-parallel SGD with a server-side optimizer.

Each step every participant sends the gradient of the mean loss on its batch; the
server averages them weighted by batch size (the gradient of the mean loss on the
union of the batches), then steps a torch optimizer on the global model. With the
whole shard as the batch this is exactly full-batch gradient descent on the union
of the workers' data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from elastic_plugins.averaging import WeightedSum

from elastic.api import (
    Aggregator,
    JobSpecError,
    Partial,
    Update,
    check_params,
    hookimpl,
    update_template,
)

__all__ = ["SyncAvg"]


class SyncAvg(Aggregator):
    """Batch-size-weighted gradient averaging plus a server optimizer.

    Parameters (``[rule]``):
        optimizer: ``"sgd"`` (default) or ``"adam"``.
        lr: the server learning rate (default 0.1).
        momentum: SGD momentum (default 0.0).
        weight_decay: (default 0.0).
    """

    name = "syncavg"
    worker_mode = "gradient"
    averages = True

    def __init__(self, params: Mapping[str, Any]) -> None:
        p = check_params(
            "rule syncavg",
            params,
            {"optimizer": str, "lr": float, "momentum": float, "weight_decay": float},
        )
        self.optimizer_name = p.get("optimizer", "sgd")
        self.lr = p.get("lr", 0.1)
        self.momentum = p.get("momentum", 0.0)
        self.weight_decay = p.get("weight_decay", 0.0)
        if self.optimizer_name not in ("sgd", "adam"):
            raise JobSpecError(
                f'rule syncavg: optimizer must be "sgd" or "adam", got {self.optimizer_name!r}'
            )
        if self.lr <= 0:
            raise JobSpecError(f"rule syncavg: lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise JobSpecError(f"rule syncavg: momentum must be in [0, 1), got {self.momentum}")
        super().__init__(p)

    def setup(self, model: torch.nn.Module) -> None:
        self._params = update_template(model, "gradient")
        params = list(self._params.values())
        if self.optimizer_name == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=self.lr, weight_decay=self.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        self._sum = WeightedSum(self._params)

    def begin_round(self) -> None:
        self._sum.reset()

    folds_parts = True

    def accumulate(self, update: Update) -> None:
        self._sum.add(update.tensors, float(update.num_samples))

    def accumulate_part(self, update: Update, segments: Sequence[tuple[str, int, int]]) -> None:
        self._sum.add_part(segments, update.tensors, float(update.num_samples))

    decomposable = True  # (the batch-weighted mean gradient)

    def partial(self) -> Partial:
        return self._sum.partial()

    def merge(self, partial: Partial) -> None:
        self._sum.merge(partial)

    def finalize(self) -> None:
        if not self._sum.any_weight:
            return
        for name, grad in self._sum.mean().items():
            p = self._params[name]
            p.grad = grad.to(p.dtype).view_as(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sum.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])


@hookimpl
def elastic_aggregators() -> list[type]:
    return [SyncAvg]
