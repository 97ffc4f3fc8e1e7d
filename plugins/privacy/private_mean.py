"""The coordinator's half of differential privacy: a rule wrapped so that it
receives, in place of a round's updates, their clipped and noised mean.

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language
Models", ICLR 2018), with its fixed-denominator estimator:

    Δ̃ = (Σ_i clip_C(Δ_i) + N(0, (z_Δ C)²)) / m

where Δ_i is each update's change (trained minus sent weights, the gradient, or the
delta), m the number of clients a round asks (the buffer, for an asynchronous rule;
a round where fewer answer is not scaled up, so one client's sway stays C / m) and
z_Δ the noise multiplier left for the sum once the count of unclipped updates had
its share (adaptive clipping; z_Δ = z otherwise). The rule then gets one update,
Δ̃ (as weights: the model plus Δ̃), with one sample: FedAvg makes it the model,
FedOpt steps its server optimizer along it. In local mode the workers clipped and
noised their own updates: the coordinator averages them as they are.

Every update counts once and the same: sample counts are a client's claim, and
weighting by them would let one client's sway grow past C / m. An asynchronous
worker whose buffer already holds an update of its own shares its C between them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from elastic_plugins.privacy.clipping import add_noise_, l2_norm, secure_generator

from elastic.api import (
    Aggregator,
    AsyncAggregator,
    Update,
    WireTensor,
    update_template,
)

if TYPE_CHECKING:
    from elastic_plugins.privacy.dp import DifferentialPrivacy

__all__ = ["PrivateMean", "PrivateAsyncMean", "wrapper_for"]


class PrivateMean(Aggregator):
    """A synchronous averaging rule behind differential privacy (see the module)."""

    name = "private"  # (never registered: it wraps the job's rule, keeping its name)
    averages = True

    def __init__(self, rule: Aggregator, dp: DifferentialPrivacy) -> None:
        super().__init__(rule.params)
        self.rule = rule
        self.dp = dp

    # ----------------------------------------------------------- the rule ---

    def setup(self, model: torch.nn.Module) -> None:
        self.rule.setup(model)
        self.base = update_template(model, self.worker_mode)
        self.kind = {"gradient": "gradient", "delta": "delta"}.get(self.worker_mode, "weights")
        self._sum = {
            name: torch.zeros(t.shape, dtype=torch.float32) for name, t in self.base.items()
        }
        self.begin_round()

    def begin_round(self) -> None:
        for acc in self._sum.values():
            acc.zero_()
        self.count = 0
        self.below = 0  # updates whose norm was at most the clip (adaptive clipping)
        self.spent: dict[str, float] = {}  # per worker, the norm its updates used (async)

    def accumulate(self, update: Update) -> None:
        self._fold(update, 1.0, self.dp.clip)  # (each client's update is its own)

    def _fold(self, update: Update, weight: float, budget: float) -> float:
        """Fold ``weight`` times the update's change, clipped to norm ``budget``
        (noised updates are folded as they are: their noise is the point); returns
        the norm folded."""
        changes = self._changes(update)
        norm = l2_norm(changes.values()) * weight
        claim = update.privacy.get("below_clip")
        self.below += int(claim if isinstance(claim, bool) else norm <= self.dp.clip)
        kept = 1.0 if self.dp.local or norm <= budget else max(budget, 0.0) / norm
        for name, change in changes.items():
            self._sum[name].add_(change.view(self._sum[name].shape), alpha=weight * kept)
        self.count += 1
        return norm * kept

    def _changes(self, update: Update) -> dict[str, torch.Tensor]:
        """The update's change in float32: its tensors, less the sent weights for weights."""
        out = {}
        for name, wt in update.tensors.items():
            t = wt.to_tensor().to(torch.float32)
            if self.kind == "weights":
                t = t - self.base[name].detach().reshape(t.shape).to(torch.float32)
            out[name] = t
        return out

    def finalize(self) -> None:
        mean = self.release()
        if self.kind == "weights":
            with torch.no_grad():
                for name, t in mean.items():
                    t.add_(self.base[name].detach().reshape(t.shape).to(torch.float32))
        single = Update(
            "private-mean",
            0,
            1,
            0.0,
            self.kind,
            {
                name: WireTensor.from_tensor(
                    t.to(self.base[name].dtype).reshape(self.base[name].shape)
                )
                for name, t in mean.items()
            },
        )
        self.rule.begin_round()
        self.rule.accumulate(single)
        self.rule.finalize()

    def release(self) -> dict[str, torch.Tensor]:
        """The private mean of what was folded (the sums, consumed), accounted."""
        dp = self.dp
        denominator = self.count if dp.local else dp.expected
        noise_std = 0.0 if dp.local else dp.delta_noise * dp.clip
        add_noise_(self._sum, noise_std, secure_generator())
        for acc in self._sum.values():
            acc.div_(max(denominator, 1))
        dp.released(self.below, self.count)
        return self._sum

    # ----------------------------------------------------------- the rest ---

    def figures(self) -> dict[str, float]:
        return self.dp.figures()

    def exhausted(self) -> str | None:
        return self.dp.exhausted()

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.state_dict(), "privacy": self.dp.state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "privacy" not in state:  # (a job that had no privacy until now)
            self.rule.load_state_dict(state)
            return
        self.rule.load_state_dict(state.get("rule", {}))
        self.dp.load(state["privacy"])


class PrivateAsyncMean(PrivateMean, AsyncAggregator):
    """An asynchronous averaging rule behind differential privacy: its buffer of
    ``buffer`` updates is what is clipped, summed and noised; each update is
    weighted by the rule's staleness weight (at most 1, so its sway stays C / m)."""

    def __init__(self, rule: AsyncAggregator, dp: DifferentialPrivacy) -> None:
        super().__init__(rule, dp)
        self.async_rule = rule
        self.max_staleness = rule.max_staleness
        self.buffer = rule.buffer

    def accumulate(self, update: Update) -> None:
        weight = min(max(self.async_rule.staleness_weight(update.staleness), 0.0), 1.0)
        budget = self.dp.clip - self.spent.get(update.worker, 0.0)
        folded = self._fold(update, weight, budget)
        self.spent[update.worker] = self.spent.get(update.worker, 0.0) + folded

    def ready(self) -> bool:
        return self.count >= self.buffer


def wrapper_for(rule: Aggregator, dp: DifferentialPrivacy) -> PrivateMean:
    """``rule`` behind differential privacy, showing its name and worker mode."""
    base = PrivateAsyncMean if isinstance(rule, AsyncAggregator) else PrivateMean
    cls = type(
        f"Private{type(rule).__name__}",
        (base,),
        {"name": rule.name, "worker_mode": rule.worker_mode, "folds_parts": False},
    )
    return cls(rule, dp)
