"""Reaching etcd: the URL, the client (failing over between endpoints), retries,
watches, and the key layout.

Configured as ``etcd://[USER[:PASSWORD]@]HOST:PORT[,HOST:PORT...]/CLUSTER[?ca=FILE&cert=FILE&key=FILE]``;
the client fails over between the endpoints. ``ca`` turns on TLS (``cert`` and ``key``
add a client certificate); a user turns on etcd authentication, its password from the
URL or from ``$ELASTIC_ETCD_PASSWORD`` (better: it stays out of process lists). Key
layout (all under ``/elastic/<cluster>/``), the one place it is written down:

    members/<worker-id>            a worker's record (JSON), under the worker's lease
    slots/<worker-id>              its slot (so its data shard) as the leader gave it;
                                   deleted when the worker leaves with a goodbye
    leader                         the leading coordinator's record, under its lease
    jobs/<job-id>/spec|state|status
    rendezvous/<job-id>/generation
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from elastic.errors import ConfigError, MembershipUnavailable
from elastic.membership.cluster import LeaderRecord
from elastic.membership.urls import ClusterURL, parse_cluster_url

__all__ = [
    "PrefixWatch",
    "Keys",
    "parse_etcd_url",
    "connect",
    "read_leader",
    "retrying",
    "revoke",
    "failed_over",
]

log = logging.getLogger("elastic.etcd")
T = TypeVar("T")
DEFAULT_PORT = 2379
CONNECT_TIMEOUT = 10.0  # seconds of retrying before "etcd is unreachable"
RPC_TIMEOUT = 3.0


@dataclass(frozen=True)
class Keys:
    """The key layout of one cluster."""

    cluster: str

    @property
    def root(self) -> str:
        return f"/elastic/{self.cluster}/"

    @property
    def members(self) -> str:
        return self.root + "members/"

    def member(self, worker_id: str) -> str:
        return self.members + worker_id

    @property
    def slots(self) -> str:
        return self.root + "slots/"

    @property
    def leader(self) -> str:
        return self.root + "leader"

    def job(self, job_id: str, part: str) -> str:
        return f"{self.root}jobs/{job_id}/{part}"

    def path(self, relative: str) -> str:
        """A path relative to the cluster's root (``Election.publish_later``)."""
        return self.root + relative


def parse_etcd_url(url: str) -> ClusterURL:
    """``etcd://[USER@]h1:2379,h2:2379/CLUSTER[?ca=...]``: servers, cluster and access."""
    return parse_cluster_url(url, "etcd", DEFAULT_PORT, "ELASTIC_ETCD_PASSWORD")


def _client_class() -> type:
    """pyetcd's multi-endpoint client, moving to the next endpoint after a failure.

    pyetcd marks a failing endpoint but keeps using it once ``time_retry`` has
    passed, so a dead member would be retried on every call; here the next
    endpoint takes over at once and stays in use while it answers.
    """
    import grpc  # noqa: PLC0415 - only daemons that use etcd pay for importing grpc
    import pyetcd  # noqa: PLC0415
    from pyetcd.client import _EXCEPTIONS_BY_CODE, _FAILED_EP_CODES  # noqa: PLC0415

    class FailoverClient(pyetcd.MultiEndpointEtcd3Client):  # type: ignore[misc]
        def _manage_grpc_errors(self, exc: grpc.RpcError) -> None:  # replaces pyetcd's
            code = exc.code()
            if code in _FAILED_EP_CODES:
                self.rotate()
            mapped = _EXCEPTIONS_BY_CODE.get(code)
            if mapped is None:
                raise exc
            raise mapped()

        def rotate(self) -> None:
            """Mark the endpoint in use failed and move to the next one."""
            current: str = self._current_endpoint_label  # type: ignore[has-type]
            self.endpoints[current].fail()
            labels = list(self.endpoints)
            if len(labels) > 1:
                self._current_endpoint_label = labels[
                    (labels.index(current) + 1) % len(labels)
                ]  # drops old stubs

    return FailoverClient


def connect(url: str, timeout: float = CONNECT_TIMEOUT) -> Any:
    """A client for the URL's endpoints, once one of them answers.

    Retries with backoff for ``timeout`` seconds, then raises ``MembershipUnavailable``
    naming the endpoints and the fix.
    """
    import grpc  # noqa: PLC0415
    import pyetcd  # noqa: PLC0415 - only daemons that use etcd pay for importing grpc

    access = parse_etcd_url(url)
    endpoints = access.servers
    names = ", ".join(f"{h}:{p}" for h, p in endpoints)
    creds = None
    if access.ca:
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(read(access.ca), read(access.key), read(access.cert))

    def make() -> Any:  # authenticates at once when a user is given
        return _client_class()(
            endpoints=[
                pyetcd.Endpoint(h, p, secure=creds is not None, creds=creds, time_retry=1.0)
                for h, p in endpoints
            ],
            timeout=RPC_TIMEOUT,
            failover=True,
            user=access.user or None,
            password=access.password or None,
        )

    client = None
    deadline, delay, tries = time.monotonic() + timeout, 0.1, 0
    while True:
        tries += 1
        try:
            client = client or make()
            client.status()
            return client
        except Exception as exc:  # grpc and pyetcd raise many types for "not reachable"
            code = exc.code() if isinstance(exc, grpc.RpcError) else None
            if code in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                detail = (
                    exc.details()
                    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details")
                    else str(exc)
                )
                raise ConfigError(
                    f"etcd at {names} refused user {access.user!r} ({detail}); fix the user or "
                    "password of --membership"
                ) from None
            left = deadline - time.monotonic()
            if left <= 0:
                if client is not None:
                    client.close()
                raise MembershipUnavailable(
                    f"etcd unreachable at {names} after {tries} tries over {timeout:.0f}s "
                    f"({type(exc).__name__}); start etcd there or fix --membership"
                    + (
                        ""
                        if access.ca
                        else " (if etcd serves TLS, add ?ca=FILE, and cert= and key= for a client "
                        "certificate)"
                    )
                ) from None
            time.sleep(min(delay * random.uniform(0.8, 1.2), left))
            delay = min(delay * 2, 2.0)


def retrying(client: Any, what: str, call: Callable[[], T], timeout: float = CONNECT_TIMEOUT) -> T:
    """``call()``, retried with backoff while etcd fails (e.g. electing a new raft
    leader after a member died); ``MembershipUnavailable`` once ``timeout`` is spent."""
    deadline, delay = time.monotonic() + timeout, 0.1
    while True:
        try:
            return call()
        except Exception as exc:
            failed_over(client, exc)
            left = deadline - time.monotonic()
            if left <= 0:
                raise MembershipUnavailable(
                    f"etcd did not answer while {what} for {timeout:.0f}s ({type(exc).__name__}); "
                    "check the etcd cluster's health"
                ) from None
            log.warning("etcd failed while %s error=%s; retrying", what, type(exc).__name__)
            time.sleep(min(delay * random.uniform(0.8, 1.2), left))
            delay = min(delay * 2, 2.0)


def revoke(client: Any, lease: Any, what: str, ttl: int) -> None:
    """Revoke a lease, trying each endpoint once; if none answers, it ends with its TTL."""
    for _ in range(len(client.endpoints)):
        try:
            client.revoke_lease(lease.id)
            return
        except Exception as exc:  # rotated to the next endpoint by the client
            error = type(exc).__name__
    log.warning(
        "cannot revoke the %s lease error=%s; it ends by itself within %ds", what, error, ttl
    )


def failed_over(client: Any, exc: BaseException) -> None:
    """After an error from a call pyetcd does not wrap (``lease``): try the next endpoint."""
    import grpc  # noqa: PLC0415

    if isinstance(exc, grpc.RpcError):
        client.rotate()


def read_leader(client: Any, keys: Keys) -> LeaderRecord | None:
    """The current leader's record, or None when there is none."""
    value, _ = client.get(keys.leader)
    return LeaderRecord.from_json(value)


class PrefixWatch:
    """A watch on every key under ``prefix``, its events queued for the event loop.

    Events are ``(name, value)`` with ``name`` the key after the prefix and ``value``
    None for a delete. After an etcd error the watch is set up again (at most once a
    second) and the prefix read afresh: keys present come as puts, keys gone since
    come as deletes, so nothing is missed. Watch first, then read: a change between
    the two arrives twice, never zero times.
    """

    def __init__(self, client: Any, prefix: str) -> None:
        self.client, self.prefix = client, prefix
        self._queue: queue.Queue[tuple[str, bytes | None]] = queue.Queue()
        self._known: set[str] = set()  # names present, as last seen here
        self._broken = threading.Event()
        self._next_try = 0.0
        self._watch: Any = None
        retrying(client, f"watching {prefix}", self._start)

    def _start(self) -> None:
        self._watch = self.client.add_watch_prefix_callback(self.prefix, self._on_event)
        present = {
            self._name(meta.key): value for value, meta in self.client.get_prefix(self.prefix)
        }
        for name in self._known - set(present):
            self._queue.put((name, None))
        for name, value in present.items():
            self._queue.put((name, value))

    def _on_event(self, response: Any) -> None:  # on pyetcd's watcher thread: only queue
        if isinstance(response, Exception):
            if not self._broken.is_set():
                log.warning(
                    "etcd watch broke prefix=%s error=%s; watching again once etcd answers",
                    self.prefix,
                    type(response).__name__,
                )
            self._broken.set()
            return
        for event in response.events:
            deleted = type(event).__name__ == "DeleteEvent"
            self._queue.put((self._name(event.key), None if deleted else event.value))

    def _name(self, key: bytes) -> str:
        return key.decode("utf-8", "replace")[len(self.prefix) :]

    def changes(self, now: float) -> list[tuple[str, bytes | None]]:
        """What changed since the last call (watching again first if the watch broke)."""
        if self._broken.is_set() and now >= self._next_try:
            self._next_try = now + 1.0
            try:
                self._start()
                self._broken.clear()
                log.info("watching etcd again prefix=%s", self.prefix)
            except Exception as exc:  # still away: nothing changes meanwhile
                failed_over(self.client, exc)
        out: list[tuple[str, bytes | None]] = []
        while True:
            try:
                name, value = self._queue.get_nowait()
            except queue.Empty:
                return out
            (self._known.discard if value is None else self._known.add)(name)
            out.append((name, value))

    def close(self) -> None:
        try:
            self.client.cancel_watch(self._watch)
        except Exception:  # closing anyway
            pass
