"""Who works in a round, on what, and how much: the sampled virtual clients, their
spread over the worker processes there are, and the stragglers' lighter work.

Every draw is seeded by the job's seed and the round's number, so a round re-run
(abandoned, or after a failover) asks the same clients for the same work.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy

from elastic.jobspec import JobSpec

__all__ = ["sample_clients", "local_work", "spread"]

_CLIENTS, _STRAGGLERS = 1, 2  # streams of draws, so one never shifts the other


def _rng(spec: JobSpec, number: int, stream: int) -> random.Random:
    return random.Random((spec.seed * 1_000_003 + number) * 7 + stream)


def sample_clients(spec: JobSpec, number: int) -> list[int]:
    """The virtual clients asked in round ``number``: ``spec.sampled_clients`` of
    ``spec.clients``, without repeats, in ascending order.

    ``client_sampling = "random"`` draws each round anew (FedAvg's uniform
    sampling); ``"poisson"`` takes each client with probability k / clients, on
    its own (the sampling differential privacy's accountants amplify best: a
    binomial number of clients, then that many uniformly; a draw of nobody is drawn
    again, which happens with probability (1 - k / clients)^clients); ``"cycle"``
    walks a seeded shuffle of all clients, so each is asked once per pass of
    ``ceil(clients / per round)`` rounds (the last round of a pass is topped up from
    the start of its shuffle)."""
    count, k = spec.clients, spec.sampled_clients
    if spec.client_sampling == "poisson":
        generator = numpy.random.default_rng((spec.seed * 1_000_003 + number) * 7 + _CLIENTS)
        while True:
            drawn = int(generator.binomial(count, k / count))
            if drawn:
                return sorted(int(c) for c in generator.choice(count, drawn, replace=False))
    if spec.client_sampling != "cycle":
        return sorted(_rng(spec, number, _CLIENTS).sample(range(count), k))
    per_pass = math.ceil(count / k)
    pass_, position = divmod(number - 1, per_pass)
    order = _rng(spec, pass_, _CLIENTS).sample(range(count), count)
    chosen = order[position * k : (position + 1) * k]
    chosen += order[: k - len(chosen)]  # only the last round of a pass is short
    return sorted(chosen)


def local_work(spec: JobSpec, number: int, ids: Sequence[int], keep: int = 1) -> dict[int, int]:
    """The local epochs each of ``ids`` does in round ``number``: ``local_epochs``,
    or for the stragglers (``[train] stragglers`` of them, rounded to the nearest)
    a number drawn from ``straggler_epochs``. With ``drop_stragglers`` the
    stragglers are left out of the answer instead, but never so many that fewer than
    ``keep`` remain (a round needs its ``min_workers`` updates)."""
    train = spec.train
    full = {i: train.local_epochs for i in ids}
    count = math.floor(train.stragglers * len(ids) + 0.5)
    if train.drop_stragglers:
        count = min(count, max(0, len(ids) - keep))
    if count == 0:
        return full
    rng = _rng(spec, number, _STRAGGLERS)
    chosen = rng.sample(sorted(ids), count)
    if train.drop_stragglers:
        return {i: e for i, e in full.items() if i not in set(chosen)}
    low, high = train.straggler_epochs or (1, train.local_epochs)
    for i in sorted(chosen):
        full[i] = rng.randint(low, high)
    return full


def spread(clients: Sequence[int], workers: Sequence[str]) -> dict[str, list[int]]:
    """The clients each worker serves: as even as can be (no worker gets two more
    than another), each client at its home worker (``client % len(workers)``) when
    that one has room, so that with steady membership a client keeps coming back to
    the worker that holds its state (a codec's error-feedback residual)."""
    if not workers:
        return {}
    n = len(workers)
    quota = math.ceil(len(clients) / n)
    load: dict[str, list[int]] = {w: [] for w in workers}
    overflow = []
    for c in clients:
        home = workers[c % n]
        if len(load[home]) < quota:
            load[home].append(c)
        else:
            overflow.append(c)
    for c in overflow:
        least = min(workers, key=lambda w: len(load[w]))
        load[least].append(c)
    return {w: sorted(cs) for w, cs in load.items() if cs}
