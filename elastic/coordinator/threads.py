"""How many cores the coordinator's tensor work takes, and when.

Updates are checked and folded a frame at a time, between socket reads, while
workers (on this host, maybe) still train: on one thread (``--threads``), since
more only spin, waiting for cores the workers hold (on 2 cores with 4 workers, a
25M-parameter FedAvg round took 0.37 s with 2 threads, 0.30 s with 1). Between a
synchronous round's last update and the next round's model (the commit, the
downlink's new reference), every participant waits: that work takes every core.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["FOLD_THREADS", "every_core"]

FOLD_THREADS = 1  # the coordinator's default (--threads): see above


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def every_core(workers_wait: bool = True) -> Iterator[None]:
    """torch's intra-op threads raised to every core this process may use, for the
    block, when ``workers_wait`` (nobody else needs the cores meanwhile)."""
    threads, cores = torch.get_num_threads(), _cores()
    if not workers_wait or cores <= threads:
        yield
        return
    torch.set_num_threads(cores)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
