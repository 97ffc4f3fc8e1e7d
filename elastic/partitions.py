"""Partitioners: how a task splits its samples among clients, the same way on every
host from the job's seed (a worker computes the whole split and keeps its part).

A scheme is a short string, as a job's ``[task] partition`` gives it:

* ``iid``: a random permutation cut into equal parts;
* ``dirichlet:ALPHA``: each class spread over the parts in proportions drawn from
  Dirichlet(ALPHA) (Hsu et al. 2019); small ALPHA, few classes a part;
* ``pathological:K``: samples sorted by label, cut into ``parts * K`` runs, K runs a
  part (McMahan et al. 2017): about K classes each;
* ``quantity:SIGMA``: IID labels, part sizes log-normal with spread SIGMA;
* ``natural``: by a key each sample has (a column, a file, a sub-directory): every
  key's samples stay together, keys dealt round-robin in sorted order.

Every split is a partition (disjoint parts covering every sample), reproducible
from its seed, and gives every part at least one sample (or raises
``JobSpecError`` saying why it cannot).
"""

from __future__ import annotations

import math

import numpy as np

from elastic.errors import JobSpecError

__all__ = ["SCHEMES", "check_partition", "partition"]

SCHEMES = ("iid", "dirichlet:ALPHA", "pathological:K", "quantity:SIGMA", "natural")
MIN_PART = 10  # a Dirichlet draw leaving a part fewer samples than this is drawn again


def check_partition(scheme: str, where: str = "partition") -> tuple[str, float]:
    """The scheme's kind and its number (0 where it takes none); ``JobSpecError``
    naming the known schemes for anything else."""
    kind, _, arg = scheme.partition(":")
    fix = f"use one of {', '.join(SCHEMES)}"
    if kind in ("iid", "natural"):
        if arg:
            raise JobSpecError(f"{where}: {kind} takes no argument, got {scheme!r}; {fix}")
        return kind, 0.0
    if kind not in ("dirichlet", "pathological", "quantity"):
        raise JobSpecError(f"{where}: unknown partition {scheme!r}; {fix}")
    try:
        value = float(arg)
    except ValueError:
        raise JobSpecError(f"{where}: {scheme!r} needs a number after ':'; {fix}") from None
    if not math.isfinite(value) or value <= 0 or (kind == "pathological" and value != int(value)):
        raise JobSpecError(
            f"{where}: {scheme!r}: the number must be "
            f"{'a whole number >= 1' if kind == 'pathological' else 'finite and > 0'}"
        )
    return kind, value


def partition(
    labels: np.ndarray,
    parts: int,
    scheme: str,
    seed: int,
    keys: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Sample indices (``0 .. len(labels) - 1``) in ``parts`` sorted arrays by
    ``scheme``. ``labels``: each sample's class (the label-driven schemes use it;
    any array of the samples' length otherwise); ``keys``: each sample's key, for
    ``natural``."""
    kind, value = check_partition(scheme)
    n = len(labels)
    if parts < 1 or n < parts:
        raise JobSpecError(
            f"partition {scheme}: {n} samples cannot fill {parts} parts; use fewer clients "
            "or more data"
        )
    rng = np.random.default_rng(seed)
    if kind == "iid":
        pieces = np.array_split(rng.permutation(n), parts)
    elif kind == "dirichlet":
        pieces = _dirichlet(np.asarray(labels), parts, value, rng, scheme)
    elif kind == "pathological":
        pieces = _pathological(np.asarray(labels), parts, int(value), rng, scheme)
    elif kind == "quantity":
        sizes = rng.lognormal(0.0, value, parts)
        counts = 1 + np.floor(sizes / sizes.sum() * (n - parts)).astype(np.int64)
        counts[: n - counts.sum()] += 1  # what flooring left over, one each
        pieces = np.split(rng.permutation(n), np.cumsum(counts)[:-1])
    else:
        pieces = _natural(keys, n, parts, scheme)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in pieces]


def _dirichlet(
    labels: np.ndarray, parts: int, alpha: float, rng: np.random.Generator, scheme: str
) -> list[np.ndarray]:
    classes = np.unique(labels)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(parts)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * parts)) * len(idx)).astype(int)[:-1]
            for shard, piece in zip(shards, np.split(idx, cuts), strict=True):
                shard.extend(piece.tolist())
        if min(len(s) for s in shards) >= max(1, min(MIN_PART, len(labels) // parts)):
            return [np.array(s, dtype=np.int64) for s in shards]
    raise JobSpecError(
        f"partition {scheme}: no split into {parts} parts gives every part data; raise alpha"
    )


def _pathological(
    labels: np.ndarray, parts: int, k: int, rng: np.random.Generator, scheme: str
) -> list[np.ndarray]:
    if len(labels) < parts * k:
        raise JobSpecError(
            f"partition {scheme}: {len(labels)} samples cannot make {parts} x {k} runs; "
            "lower K or use fewer clients"
        )
    shuffled = rng.permutation(len(labels))  # random order within each class
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    runs = np.array_split(by_label, parts * k)
    order = rng.permutation(parts * k)
    return [np.concatenate([runs[r] for r in order[i * k : (i + 1) * k]]) for i in range(parts)]


def _natural(keys: np.ndarray | None, n: int, parts: int, scheme: str) -> list[np.ndarray]:
    if keys is None or len(keys) != n:
        raise JobSpecError(
            f"partition {scheme}: the task gives no key per sample; natural needs one "
            "(a column, a file, a sub-directory)"
        )
    names, which = np.unique(np.asarray(keys), return_inverse=True)
    if len(names) < parts:
        raise JobSpecError(
            f"partition {scheme}: {len(names)} keys cannot fill {parts} parts; use at most "
            f"{len(names)} clients"
        )
    return [np.flatnonzero(which % parts == i) for i in range(parts)]
