"""``dp``: differential privacy for averaging rules, with its privacy accounted.

```toml
[privacy]
mechanism = "dp"          # the default
clip = 1.0                # C: the L2 norm each update's change is clipped to
noise_multiplier = 1.0    # z (or target_epsilon = 3: z calibrated for the job's rounds)
delta = 1e-5              # ε is given at this δ; below 1 / clients
max_epsilon = 8           # the job ends (budget_spent) before a round would pass it
```

Central mode (the default) trusts the coordinator: it clips each update (or the
workers do, ``clip_on = "worker"``, so it never sees an unclipped one), sums them,
adds N(0, (zC)²) once, and divides by the clients a round asks. Local mode trusts
nobody: each worker clips and adds N(0, (zC)²) to its own update. ``adaptive =
true`` moves C each round towards the ``target_quantile`` of the update norms
(Andrew et al. 2021), from a noised count of the updates that were not clipped.

The privacy is user level: one client's whole data. ε after each round, at δ,
comes from ``dp-accounting`` (``accountant = "rdp"`` or ``"pld"``), with the
job's real sampling: exactly m of n clients a round (``[job] client_sampling =
"random"``, or a fraction of the workers), each client with probability m / n
(``"poisson"``), or every client in every asynchronous version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from elastic_plugins.privacy.accounting import ACCOUNTANTS, Accountant, calibrate
from elastic_plugins.privacy.clipping import (
    add_noise_,
    clip_,
    delta_noise_multiplier,
    next_clip,
    secure_generator,
)
from elastic_plugins.privacy.private_mean import wrapper_for

from elastic.api import (
    Aggregator,
    AsyncAggregator,
    Channel,
    JobSpec,
    JobSpecError,
    PrivacyMechanism,
    check_params,
    hookimpl,
)

__all__ = ["DifferentialPrivacy"]

_PARAMS: dict[str, type | tuple[type, ...]] = {
    "mode": str,
    "clip": float,
    "noise_multiplier": float,
    "target_epsilon": float,
    "delta": float,
    "max_epsilon": float,
    "accountant": str,
    "clip_on": str,
    "adaptive": bool,
    "target_quantile": float,
    "clip_lr": float,
    "count_stddev": float,
}


class DifferentialPrivacy(PrivacyMechanism):
    """Clipping, Gaussian noise and an accountant (see the module).

    Parameters (``[privacy]``):
        mode: ``"central"`` (default) or ``"local"``.
        clip: C > 0, the clipping norm (the starting one when adaptive).
        noise_multiplier: z > 0; or target_epsilon, to calibrate z for ``rounds``.
        delta: δ in (0, 1 / clients) (default 1e-5).
        max_epsilon: end the job before a round would spend more (default: no limit).
        accountant: ``"rdp"`` (default) or ``"pld"``.
        clip_on: ``"coordinator"`` (default; central mode) or ``"worker"``.
        adaptive: move C towards a quantile of the norms (default false).
        target_quantile: that quantile (default 0.5); clip_lr: its rate (default 0.2);
        count_stddev: the noise of the count (default clients per round / 20).
    """

    name = "dp"

    def __init__(self, params: Mapping[str, Any], spec: JobSpec) -> None:
        super().__init__(params, spec)
        p = check_params("[privacy]", params, _PARAMS)
        self.local = _choice(p, "mode", ("central", "local")) == "local"
        self.clip_on = _choice(p, "clip_on", ("coordinator", "worker"))
        if self.local:
            if p.get("clip_on", "worker") != "worker":
                raise JobSpecError(
                    '[privacy] mode = "local" clips and noises on the worker; drop clip_on'
                )
            self.clip_on = "worker"
        self.adaptive = bool(p.get("adaptive", False))
        self.population = spec.population
        self.delta = p.get("delta", 1e-5)
        self.max_epsilon = p.get("max_epsilon", 0.0)
        self.accountant = Accountant(
            _choice(p, "accountant", ACCOUNTANTS), _sampling(spec), self.delta
        )
        self.quantile = p.get("target_quantile", 0.5)
        self.clip_lr = p.get("clip_lr", 0.2)
        self._check(p)
        self.clip = float(p["clip"])
        self.expected = spec.per_round  # m: the fixed denominator (or the buffer: ``wrap``)
        self.count_std = p.get("count_stddev", self.expected / 20) if self.adaptive else 0.0
        self._given = p
        self.z = 0.0
        self.unclipped = math.nan  # the noised share of updates under the clip, last round
        self._epsilon: float | None = None
        self._then: float | None = None  # ε after one more release

    def _check(self, p: dict[str, Any]) -> None:
        """Refuse settings that protect nothing or cannot be accounted."""
        spec = self.spec
        if "clip" not in p:
            raise JobSpecError(
                "[privacy] noise needs clipping: set clip (the L2 norm each update is clipped "
                "to, e.g. clip = 1.0), or drop [privacy]"
            )
        if p["clip"] <= 0 or not math.isfinite(p["clip"]):
            raise JobSpecError(f"[privacy] clip must be > 0, got {p['clip']}")
        if ("noise_multiplier" in p) == ("target_epsilon" in p):
            raise JobSpecError(
                "[privacy] give noise_multiplier (z, e.g. 1.0) or target_epsilon (ε for the "
                "job's rounds, e.g. 3), one of them; for clipping alone use [limits] max_norm "
                'with norm_action = "clip"'
            )
        for key in ("noise_multiplier", "target_epsilon", "max_epsilon"):
            if key in p and not (p[key] > 0 and math.isfinite(p[key])):
                raise JobSpecError(f"[privacy] {key} must be a number > 0, got {p[key]}")
        if not 0 < self.delta < 1 / self.population:
            raise JobSpecError(
                f"[privacy] delta = {self.delta} must be in (0, 1/{self.population}): the job's "
                f"data belongs to {self.population} clients, and δ ≥ 1/n lets a mechanism give "
                f"away one whole client's data; use e.g. delta = {_below(self.population)}"
            )
        if spec.checkpoint.every != 1:
            raise JobSpecError(
                f"[checkpoint] every = {spec.checkpoint.every}: with [privacy] every round must "
                "be checkpointed, or a crash re-runs rounds whose models went out, spending "
                "privacy the accountant no longer knows of; set every = 1"
            )
        if not 0 < self.quantile < 1 or self.clip_lr <= 0:
            raise JobSpecError(
                "[privacy] target_quantile must be in (0, 1) and clip_lr > 0, e.g. "
                "target_quantile = 0.5, clip_lr = 0.2"
            )
        if self.adaptive and self.local:
            raise JobSpecError(
                "[privacy] adaptive clipping needs the coordinator to count unclipped updates, "
                'which local DP keeps from it; drop adaptive or use mode = "central"'
            )

    # ----------------------------------------------------------- the rule ---

    def wrap(self, rule: Aggregator) -> Aggregator:
        spec = self.spec
        if not rule.averages:
            raise JobSpecError(
                f"[privacy] rule {spec.rule} does not average its updates, and differential "
                "privacy gives a rule one clipped, noised mean in their place; use fedavg, the "
                "fedopt family, syncavg or async"
            )
        if isinstance(rule, AsyncAggregator):
            self.expected = rule.buffer  # a version is a buffer: every client may be in it
            if self.adaptive:
                self.count_std = self._given.get("count_stddev", self.expected / 20)
            releases, m, n = spec.rounds, self.population, self.population
        else:
            releases, m, n = spec.rounds, self.expected, self.population
        self.m, self.n = m, n
        if self.accountant.kind == "pld" and self.accountant.sampling == "fixed" and m < n:
            raise JobSpecError(
                '[privacy] accountant = "pld" accounts Poisson sampling only, and the job '
                f"samples exactly {m} of {n} clients a round; set [job] client_sampling = "
                '"poisson" or use accountant = "rdp"'
            )
        if "target_epsilon" in self._given:
            if self.max_epsilon and self._given["target_epsilon"] > self.max_epsilon:
                raise JobSpecError(
                    f"[privacy] target_epsilon = {self._given['target_epsilon']} is above "
                    f"max_epsilon = {self.max_epsilon}; lower it"
                )
            z = calibrate(
                self.accountant, self._given["target_epsilon"], releases, *self._event_shape()
            )
            self.z = 2 * z if self.local else z  # (the accountant sees z / 2 of a local update)
        else:
            self.z = float(self._given["noise_multiplier"])
        if self.adaptive and 2 * self.count_std <= self.z:
            raise JobSpecError(
                f"[privacy] count_stddev = {self.count_std:g} leaves no noise budget for the "
                f"updates at noise_multiplier {self.z:g} (adaptive clipping needs 2 count_stddev "
                f"> z); raise count_stddev above {self.z / 2:g}"
            )
        self.delta_noise = (
            delta_noise_multiplier(self.z, self.count_std) if self.adaptive else self.z
        )
        first = self.accountant.epsilon((self.z_accounted, *self._event_shape()))
        if self.max_epsilon and first > self.max_epsilon:
            raise JobSpecError(
                f"[privacy] one round alone spends ε = {first:.3g} > max_epsilon = "
                f"{self.max_epsilon} at δ = {self.delta}; raise noise_multiplier or max_epsilon"
            )
        return wrapper_for(rule, self)

    @property
    def z_accounted(self) -> float:
        """The multiplier the accountant sees: z, or z / 2 for a local update (any
        update can become any other: twice the sensitivity)."""
        return self.z / 2 if self.local else self.z

    def _event_shape(self) -> tuple[int, int]:
        """(m, n) of one release: every client every round in local mode (a worker's
        own update is seen whenever it is sent)."""
        return (1, 1) if self.local else (self.m, self.n)

    def released(self, below: int, count: int) -> None:
        """A release was made (``count`` updates, ``below`` of them under the clip):
        account it, and move the clip when adaptive."""
        self.accountant.add(self.z_accounted, *self._event_shape())
        self._epsilon = self._then = None
        if self.adaptive:
            noise = torch.empty(1).normal_(0.0, self.count_std, generator=secure_generator())
            self.unclipped = (below + float(noise)) / self.expected
            self.clip = next_clip(self.clip, self.unclipped, self.quantile, self.clip_lr)

    # ---------------------------------------------------------- the status ---

    def epsilon(self) -> float:
        """ε at δ so far (computed once per release: the metrics ask often)."""
        if self._epsilon is None:
            self._epsilon = self.accountant.epsilon()
        return self._epsilon

    def figures(self) -> dict[str, float]:
        figures = {
            "epsilon": round(self.epsilon(), 6),
            "dp_delta": self.delta,
            "noise_multiplier": self.z,
            "clip_norm": self.clip,
        }
        if self.adaptive and not math.isnan(self.unclipped):
            figures["unclipped_share"] = round(self.unclipped, 6)
        return figures

    def exhausted(self) -> str | None:
        if not self.max_epsilon:
            return None
        if self._then is None:  # (asked before every round: once per release)
            self._then = self.accountant.epsilon((self.z_accounted, *self._event_shape()))
        then = self._then
        if then <= self.max_epsilon:
            return None
        return (
            f"privacy budget spent: one more round would make ε {then:.4g} > max_epsilon "
            f"{self.max_epsilon:g} at δ {self.delta:g} (now ε {self.epsilon():.4g})"
        )

    def state(self) -> dict[str, Any]:
        return {**self.accountant.state(), "clip": self.clip}

    def load(self, state: Mapping[str, Any]) -> None:
        self.accountant.load(dict(state))
        self._epsilon = self._then = None
        if self.adaptive:  # (a fixed clip is the spec's, which may have been changed)
            self.clip = float(state.get("clip", self.clip))

    # ---------------------------------------------------------- the worker ---

    def worker_settings(self) -> dict[str, Any]:
        if self.clip_on != "worker":
            return {}
        settings: dict[str, Any] = {"clip": self.clip}
        if self.local:
            settings["noise_std"] = self.z * self.clip
        return settings

    @classmethod
    def protect(
        cls,
        settings: Mapping[str, Any],
        change: dict[str, torch.Tensor],
        channel: Channel | None = None,
    ) -> dict[str, Any]:
        clip, noise = settings.get("clip"), settings.get("noise_std", 0.0)
        if not _positive(clip) or not (noise == 0.0 or _positive(noise)):
            raise ValueError(f"privacy settings {dict(settings)} need clip > 0 and noise_std >= 0")
        assert clip is not None
        with torch.no_grad():
            norm = clip_(change, float(clip))
            if not noise:
                return {"below_clip": norm <= float(clip)}
            device = next(iter(change.values())).device if change else "cpu"
            add_noise_(change, float(noise), secure_generator(device))
        # Local DP: nothing else about the data leaves the worker (its sample count,
        # its loss); the noised change is all the coordinator learns.
        return {"num_samples": 1, "loss": 0.0}


def _sampling(spec: JobSpec) -> str:
    """How the job draws a round's clients, as the accountant needs it."""
    if spec.clients and spec.client_sampling == "cycle":
        raise JobSpecError(
            '[privacy] [job] client_sampling = "cycle" asks clients in an order fixed by the '
            'job\'s seed, which no accountant can amplify; use "poisson" (the best '
            'accounted) or "random"'
        )
    return "poisson" if spec.clients and spec.client_sampling == "poisson" else "fixed"


def _choice(p: Mapping[str, Any], key: str, options: tuple[str, ...]) -> str:
    value = p.get(key, options[0])
    if value not in options:
        raise JobSpecError(
            f"[privacy] {key} must be one of {', '.join(repr(o) for o in options)}, got {value!r}"
        )
    return str(value)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def _below(n: int) -> str:
    """A round δ below 1/n: the power of ten at most 1/(10 n)."""
    return f"1e-{math.ceil(math.log10(10 * n))}"


@hookimpl
def elastic_privacy_mechanisms() -> list[type]:
    return [DifferentialPrivacy]
