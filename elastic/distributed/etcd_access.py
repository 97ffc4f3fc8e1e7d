"""Reaching etcd v3 for torch.distributed: the endpoint a torchrun user gives, and the
lease a run's keys live under.

An endpoint is either ``HOST:PORT[,HOST:PORT...]`` (plain, as torchrun users write it)
or the same ``etcd://[USER@]HOST:PORT,.../CLUSTER?ca=FILE&cert=FILE&key=FILE`` URL the
daemons take, for TLS and authentication (the password from the URL or, better,
``$ELASTIC_ETCD_PASSWORD``). Keys live under ``/elastic/<cluster>/torch/<run>/``; the
cluster is ``torchrun`` when the endpoint names none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from elastic.membership.etcd.client import connect, parse_etcd_url, retrying

__all__ = ["DEFAULT_CLUSTER", "RunLease", "connect_endpoint", "run_prefix"]

log = logging.getLogger("elastic.distributed")
T = TypeVar("T")
DEFAULT_CLUSTER = "torchrun"


def _as_url(endpoint: str) -> str:
    endpoint = endpoint.strip()
    if endpoint.startswith("etcd://"):
        return endpoint
    return f"etcd://{endpoint or '127.0.0.1:2379'}/{DEFAULT_CLUSTER}"


def connect_endpoint(endpoint: str, timeout: float) -> tuple[Any, str]:
    """A client for ``endpoint`` and its cluster's name; ``ConfigError`` for a bad
    endpoint, ``MembershipUnavailable`` when no server answers within ``timeout``."""
    url = _as_url(endpoint)
    cluster = parse_etcd_url(url).cluster
    return connect(url, timeout), cluster


def run_prefix(cluster: str, run_id: str) -> str:
    """Where one run's keys live (state, store), below the cluster's root."""
    if not run_id or "/" in run_id or not run_id.isprintable():
        raise ValueError(f"run id {run_id!r} must be non-empty, printable and without '/'")
    return f"/elastic/{cluster}/torch/{run_id}/"


class RunLease:
    """The lease that a process's keys of one run are written under, so that a run
    left behind cleans itself up ``ttl`` seconds after its last writer stopped.

    Granted on first use and refreshed by writes once half its TTL has passed (no
    thread): a process that writes keeps its keys; one that died loses them later.
    """

    def __init__(self, client: Any, ttl: int) -> None:
        if ttl < 10:
            raise ValueError(f"the TTL of a run's keys must be at least 10 s, got {ttl}")
        self.client, self.ttl = client, ttl
        self._lease: Any = None
        self._renewed = 0.0
        self._lock = threading.Lock()

    def id(self) -> int:
        """The lease's id, granted again when it expired or was revoked."""
        with self._lock:
            now = time.monotonic()
            if self._lease is not None and now - self._renewed > self.ttl / 2:
                responses = retrying(self.client, "renewing a lease", self._lease.refresh)
                if responses and responses[0].TTL > 0:
                    self._renewed = now
                else:
                    log.info("the lease of this run's keys expired; granting another")
                    self._lease = None
            if self._lease is None:
                self._lease = retrying(
                    self.client, "granting a lease", lambda: self.client.lease(self.ttl)
                )
                self._renewed = now
            return int(self._lease.id)

    def writing(self, call: Callable[[], T]) -> Callable[[], T]:
        """``call`` (a write under this lease), forgetting the lease when etcd no longer
        knows it (revoked, or expired while we were cut off) so a retry grants another."""

        def attempt() -> T:
            try:
                return call()
            except Exception as exc:
                code = getattr(exc, "code", None)
                if callable(code) and code().name == "NOT_FOUND":
                    with self._lock:
                        self._lease = None
                raise

        return attempt
