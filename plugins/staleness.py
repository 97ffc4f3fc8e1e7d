"""Staleness functions s(τ): how much an update computed τ versions ago still counts.

From Xie et al., "Asynchronous Federated Optimization" (2019): ``constant`` is 1;
``polynomial`` is (1 + τ)^-a; ``hinge`` is 1 up to τ = b, then 1 / (a (τ - b) + 1).
Each is 1 at τ = 0 and never increases with τ.
"""

from __future__ import annotations

from collections.abc import Callable

from elastic.api import JobSpecError

__all__ = ["staleness_function", "KINDS"]

KINDS = ("constant", "polynomial", "hinge")
DEFAULT_A = {"polynomial": 0.5, "hinge": 10.0}
DEFAULT_B = 4


def staleness_function(
    kind: str, a: float | None = None, b: int | None = None, owner: str = "rule"
) -> Callable[[int], float]:
    """s(τ) for ``kind``, with its parameters ``a`` and ``b`` (defaults when None)."""
    if kind not in KINDS:
        raise JobSpecError(f"{owner}: staleness must be one of {', '.join(KINDS)}, got {kind!r}")
    a = DEFAULT_A.get(kind, 0.0) if a is None else a
    b = DEFAULT_B if b is None else b
    if a < 0:
        raise JobSpecError(f"{owner}: staleness_a must be >= 0, got {a}")
    if b < 0:
        raise JobSpecError(f"{owner}: staleness_b must be >= 0, got {b}")
    if kind == "constant":
        return lambda tau: 1.0
    if kind == "polynomial":
        return lambda tau: float((1.0 + tau) ** -a)
    return lambda tau: 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
