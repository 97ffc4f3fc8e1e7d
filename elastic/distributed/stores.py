"""Where a collective job's members meet: the c10d store a WORK names.

``coordinator:PORT``: a TCPStore the coordinator hosts (the embedded backend: one
machine, or no cluster store to use); ``cluster``: the cluster backend itself (etcd
v3, under ``/elastic/<cluster>/collective/<job>/``), so no process hosts the store
and a coordinator's failover loses nothing. Each generation's keys are prefixed by
the job and the generation (``PrefixStore``) by the member.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import torch.distributed as dist

from elastic.errors import ElasticError

__all__ = ["StoreOpener", "host_store", "STORE_TTL"]

STORE_TTL = 3600  # seconds a job's keys in etcd outlive their last writer
CONNECT = timedelta(seconds=60)


def host_store(host: str = "0.0.0.0") -> dist.TCPStore:
    """A TCPStore served by this process (the coordinator's), on a free port."""
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=CONNECT)


class StoreOpener:
    """A worker's way to its collective jobs' stores, each opened once."""

    def __init__(self, coordinator: Any, membership: str) -> None:
        self.coordinator = coordinator  # () -> the coordinator's address now (tcp://host:port)
        self.membership = membership
        self._open: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def __call__(self, spec: str, job: str) -> Any:
        with self._lock:
            kind, _, port = spec.partition(":")
            if kind == "coordinator" and port.isdigit():
                host = urlsplit(self.coordinator()).hostname or "127.0.0.1"
                where = (f"{host}:{port}", "")
                if where not in self._open:
                    self._open[where] = dist.TCPStore(
                        host, int(port), is_master=False, wait_for_workers=False, timeout=CONNECT
                    )
                return self._open[where]
            if kind == "cluster":
                where = ("cluster", job)
                if where not in self._open:
                    self._open[where] = self._cluster_store(job)
                return self._open[where]
            raise ElasticError(f"unknown collective store {spec!r}: coordinator:PORT or cluster")

    def _cluster_store(self, job: str) -> Any:
        from elastic.distributed.etcd_access import RunLease  # noqa: PLC0415
        from elastic.distributed.etcd_store import EtcdV3Store  # noqa: PLC0415
        from elastic.membership.etcd.client import connect, parse_etcd_url  # noqa: PLC0415

        if not self.membership.startswith("etcd://"):
            raise ElasticError(
                "the job's store is the cluster's, but this worker has no etcd:// --membership"
            )
        client = connect(self.membership)
        prefix = f"/elastic/{parse_etcd_url(self.membership).cluster}/collective/{job}/"
        return EtcdV3Store(client, prefix, RunLease(client, STORE_TTL))
