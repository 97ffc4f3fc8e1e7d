"""Adaptive server optimizers on the mean delta: FedAdam, FedYogi, FedAdagrad
(Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).

With Δ the sample-weighted mean of (trained weights − global weights), per element:

    m <- β1 m + (1 - β1) Δ
    v <- v + Δ²                                  fedadagrad
    v <- v - (1 - β2) Δ² sign(v - Δ²)            fedyogi
    v <- β2 v + (1 - β2) Δ²                      fedadam
    w <- w + η m / (√v + τ)

v starts at τ² (the paper's v₋₁ ≥ τ²). τ sets how adaptive the step is: small τ
makes every coordinate move by about η per round.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from elastic_plugins.averaging import MeanDeltaRule

from elastic.api import JobSpecError, hookimpl

__all__ = ["FedAdam", "FedYogi", "FedAdagrad"]


class FedOpt(MeanDeltaRule):
    """The shared part: parameters, moments, checkpointed state.

    Parameters (``[rule]``):
        server_lr: η (default 0.1, as in Flower; tune it with tau).
        beta1: first-moment decay in [0, 1) (default 0.9).
        beta2: second-moment decay in [0, 1) (default 0.99; not used by fedadagrad).
        tau: adaptivity τ > 0 (default 1e-3).
        weighting: ``"samples"`` (default) or ``"uniform"``.
    """

    def __init__(self, params: Mapping[str, Any]) -> None:
        owner = f"rule {self.name}"
        p = self.check(
            owner, params, {"server_lr": float, "beta1": float, "beta2": float, "tau": float}
        )
        self.server_lr = p.get("server_lr", 0.1)
        self.beta1 = p.get("beta1", 0.9)
        self.beta2 = p.get("beta2", 0.99)
        self.tau = p.get("tau", 1e-3)
        if self.server_lr <= 0:
            raise JobSpecError(f"{owner}: server_lr must be > 0, got {self.server_lr}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise JobSpecError(f"{owner}: {key} must be in [0, 1), got {getattr(self, key)}")
        if self.tau <= 0:
            raise JobSpecError(f"{owner}: tau must be > 0, got {self.tau}")
        self._m: dict[str, torch.Tensor] = {}
        self._v: dict[str, torch.Tensor] = {}

    def apply_step(self, name: str, w: torch.Tensor, step: torch.Tensor) -> None:
        m = self._m.get(name)
        if m is None:
            m = self._m[name] = torch.zeros_like(step)
            self._v[name] = torch.full_like(step, self.tau**2)
        v = self._v[name]
        m.mul_(self.beta1).add_(step, alpha=1 - self.beta1)
        square = step.mul_(step)  # Δ² in place: the mean delta is scratch memory
        self.update_second_moment(v, square)
        denominator = v.sqrt().add_(self.tau)
        w.addcdiv_(m.view(w.shape), denominator.view(w.shape), value=self.server_lr)

    @abstractmethod
    def update_second_moment(self, v: torch.Tensor, square: torch.Tensor) -> None:
        """Update the second moment ``v`` in place from Δ² (``square``)."""

    def state_dict(self) -> dict[str, Any]:
        return {"m": dict(self._m), "v": dict(self._v)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._m = {k: t.clone() for k, t in state.get("m", {}).items()}
        self._v = {k: t.clone() for k, t in state.get("v", {}).items()}


class FedAdam(FedOpt):
    __doc__ = FedOpt.__doc__
    name = "fedadam"

    def update_second_moment(self, v: torch.Tensor, square: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(square, alpha=1 - self.beta2)


class FedYogi(FedOpt):
    __doc__ = FedOpt.__doc__
    name = "fedyogi"

    def update_second_moment(self, v: torch.Tensor, square: torch.Tensor) -> None:
        v.sub_(torch.sign(v - square).mul_(square), alpha=1 - self.beta2)


class FedAdagrad(FedOpt):
    __doc__ = FedOpt.__doc__
    name = "fedadagrad"

    def update_second_moment(self, v: torch.Tensor, square: torch.Tensor) -> None:
        v.add_(square)


@hookimpl
def elastic_aggregators() -> list[type]:
    return [FedAdam, FedYogi, FedAdagrad]
