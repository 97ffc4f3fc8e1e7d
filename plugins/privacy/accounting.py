"""The privacy spent by a job, computed by Google's ``dp-accounting`` library.

Each committed round (or asynchronous version) is one release of a Gaussian
mechanism of noise multiplier z (noise standard deviation over L2 sensitivity),
amplified by the sampling of clients when a round asks m of n:

- ``poisson``: each client in with probability q = m / n (add or remove one client);
- ``fixed``: a sample of exactly m of n without replacement, as the round engine
  draws it (replace one client's data: the sensitivity doubles, so the multiplier
  the accountant sees is z / 2);
- every client in every round (m = n, asynchronous versions, local DP): no
  amplification.

The rounds are kept as segments ``[z, m, n, count]``, so a job resumed with other
settings is still accounted exactly, and ε at δ is recomputed from them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp
from dp_accounting.mechanism_calibration import NoBracketIntervalFoundError

from elastic.api import JobSpecError

__all__ = ["Accountant", "calibrate", "ACCOUNTANTS", "SAMPLINGS"]

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("fixed", "poisson")
# dp-accounting's RDP warns (absl) for every order its series does not converge at:
# they are left out of the bound, which stays valid. Not a user's concern.
logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass
class Accountant:
    """ε at ``delta`` of the releases so far.

    Args:
        kind: ``rdp`` (Rényi DP, Mironov 2017) or ``pld`` (privacy loss
            distributions, tighter; Poisson sampling or none only).
        sampling: ``fixed`` or ``poisson``: how a round's m of n are drawn.
        delta: the δ ε is given at.
    """

    kind: str
    sampling: str
    delta: float
    segments: list[list[float]] = field(default_factory=list)  # [z, m, n, count]

    def add(self, z: float, m: int, n: int) -> None:
        """One release: noise multiplier ``z``, ``m`` of ``n`` clients asked."""
        if self.segments and self.segments[-1][:3] == [z, m, n]:
            self.segments[-1][3] += 1
        else:
            self.segments.append([z, m, n, 1])

    @property
    def releases(self) -> int:
        return int(sum(s[3] for s in self.segments))

    def epsilon(self, then: tuple[float, int, int] | None = None) -> float:
        """ε of the releases so far, and of one more (``then``: its z, m, n)."""
        segments = [*self.segments, [*then, 1]] if then else self.segments
        if not segments:
            return 0.0
        fixed = self.sampling == "fixed" and any(m < n for _, m, n, _ in segments)
        accountant = self._fresh(fixed)
        for z, m, n, count in segments:
            accountant.compose(self.event(z, int(m), int(n)), int(count))
        return float(accountant.get_epsilon(self.delta))

    def event(self, z: float, m: int, n: int) -> dp_accounting.DpEvent:
        """The DP event of one release."""
        if m >= n:
            return dp_accounting.GaussianDpEvent(z)
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(m / n, dp_accounting.GaussianDpEvent(z))
        return dp_accounting.SampledWithoutReplacementDpEvent(
            n, m, dp_accounting.GaussianDpEvent(z / 2)
        )

    def _fresh(self, replace_one: bool) -> dp_accounting.PrivacyAccountant:
        relation = (
            dp_accounting.NeighboringRelation.REPLACE_ONE
            if replace_one
            else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        )
        if self.kind == "pld":
            return pld.PLDAccountant(neighboring_relation=relation)
        return rdp.RdpAccountant(neighboring_relation=relation)

    def state(self) -> dict[str, Any]:
        return {"segments": [list(s) for s in self.segments]}

    def load(self, state: dict[str, Any]) -> None:
        raw = state.get("segments", [])
        self.segments = [[float(z), int(m), int(n), int(c)] for z, m, n, c in raw]


def calibrate(accountant: Accountant, epsilon: float, releases: int, m: int, n: int) -> float:
    """The smallest noise multiplier for which ``releases`` rounds of m of n clients
    spend at most ``epsilon`` (binary search by ``dp-accounting``)."""

    def spent(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(accountant.event(z, m, n), releases)

    fixed = accountant.sampling == "fixed" and m < n
    try:
        z = dp_accounting.calibrate_dp_mechanism(
            lambda: accountant._fresh(fixed),
            spent,
            epsilon,
            accountant.delta,
            dp_accounting.LowerEndpointAndGuess(0.05, 1.0),
            tol=1e-4,
        )
    except (ValueError, RuntimeError, NoBracketIntervalFoundError) as exc:
        raise JobSpecError(
            f"[privacy] no noise multiplier reaches target_epsilon = {epsilon} over {releases} "
            f"rounds ({exc}); raise target_epsilon or lower rounds"
        ) from None
    return float(math.ceil(z * 1e4) / 1e4)
