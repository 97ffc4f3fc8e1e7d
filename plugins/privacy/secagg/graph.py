"""SecAgg+'s sparse graph (Bell et al. 2020): each client masks with, and shares its
secrets among, k neighbours instead of every other client, so its work grows as
O(k) = O(log n), not O(n). The graph is a Harary graph over a random order of the
round's clients: each is joined to the k/2 before and after it in that order."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

__all__ = ["neighbours", "degree_for"]


def degree_for(clients: int) -> int:
    """k for ``clients``: every other client up to 8, then about 3 log2 n (even)."""
    if clients <= 9:
        return clients - 1
    k = 2 * math.ceil(1.5 * math.log2(clients))
    return min(k, clients - 1 - (clients - 1) % 2)


def neighbours(clients: Sequence[str], degree: int, seed: int) -> dict[str, list[str]]:
    """Each client's neighbours (not itself), symmetric, in the order of ``clients``."""
    order = sorted(clients)
    random.Random(seed).shuffle(order)
    n = len(order)
    if degree >= n - 1:
        return {c: [o for o in clients if o != c] for c in clients}
    half = degree // 2
    out: dict[str, set[str]] = {c: set() for c in order}
    for i, c in enumerate(order):
        for d in range(1, half + 1):
            other = order[(i + d) % n]
            out[c].add(other)
            out[other].add(c)
    rank = {c: i for i, c in enumerate(clients)}
    return {c: sorted(out[c], key=rank.__getitem__) for c in clients}
