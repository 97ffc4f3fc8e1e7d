"""First-party training tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from elastic.api import JobSpecError, Shard, check_partition, partition

__all__ = ["seeded", "data_file", "held_out", "check_split", "check_fraction", "client_rows"]

LOCAL = "local"  # each host's data is its own already: every client trains all of it


def seeded(seed: int, build):  # type: ignore[no-untyped-def]
    """Run ``build()`` with torch's global RNG seeded, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def data_file(task: str, path: str, data_dir: Path | None) -> Path:
    """Where ``[task] path`` is on this host: as given when absolute; relative, under
    the process's data directory (a worker's ``--data``) when it has one, else under
    the working directory. A path that is not there is one error naming both."""
    given = Path(path).expanduser()
    where = given if given.is_absolute() else (data_dir or Path.cwd()) / given
    if not where.exists():
        base = "absolute" if given.is_absolute() else f"under {data_dir or Path.cwd()}"
        raise JobSpecError(
            f"task {task}: its data {path!r} is not here ({base}: {where}); give [task] path "
            "as an absolute path, or start the worker with --data DIR holding it"
        )
    return where


def held_out(n: int, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random split of ``n`` samples into train and test indices (sorted), the
    same on every host."""
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * test_fraction))) if n > 1 else 0
    return np.sort(order[k:]), np.sort(order[:k])


def check_split(scheme: str, task: str) -> None:
    """A task's ``partition``: a scheme of ``elastic.partitions``, or ``"local"``."""
    if scheme != LOCAL:
        check_partition(scheme, f"task {task}")


def client_rows(
    labels: np.ndarray, shard: Shard, scheme: str, keys: np.ndarray | None = None
) -> np.ndarray:
    """The rows of ``labels`` the client of ``shard`` trains on: its part of the split,
    or with ``"local"`` all of them (the data under a worker's ``--data`` is its own,
    already split by site)."""
    if scheme == LOCAL:
        return np.arange(len(labels))
    return partition(labels, shard.count, scheme, shard.seed, keys=keys)[shard.index % shard.count]


def check_fraction(task: str, test_fraction: float) -> None:
    """A task's ``test_fraction``: a share strictly between 0 and 1."""
    if not 0 < test_fraction < 1:
        raise JobSpecError(f"task {task}: test_fraction must be in (0, 1), got {test_fraction}")
