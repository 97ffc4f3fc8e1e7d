"""The cluster backend: what a cluster keeps that outlives any one process.

One ``ClusterBackend`` per URL scheme (``embedded://``, ``etcd://``, ``zk://``, or a
third party's, through the ``elastic_cluster_backends`` hook) offers five services,
and no code outside a backend knows which backend it talks to:

- ``member_table``: the workers taking part, and their joins and leaves (leases,
  watched); the coordinator polls it from its event loop.
- ``election``: which coordinator leads, with a fencing token every commit and
  every write of the leader is checked against, so a deposed leader writes nothing.
- ``job_store``: each job's spec, the operator's desired state and the leader's
  status, so whichever coordinator leads serves every job.
- ``registration``: a worker's record, under a lease it keeps alive, with its slot;
  and leader discovery, so the worker follows whoever leads.
- ``leader``: the leader's record, for a client that only asks (``elastic job``).

``tests/membership/conformance.py`` is the contract: every backend passes it.
"""

from __future__ import annotations

import json
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

from elastic.errors import ConfigError, PluginError
from elastic.membership.base import MemberTable

__all__ = [
    "ClusterBackend",
    "Election",
    "JobStore",
    "Registration",
    "LeaderRecord",
    "FencedOutbox",
    "DESIRED_STATES",
    "backend_class",
    "open_backend",
]

log = logging.getLogger("elastic.election")
DESIRED_STATES = ("running", "paused", "finished", "cancelled")


@dataclass(frozen=True)
class LeaderRecord:
    """What the leading coordinator publishes: where workers (``address``) and
    operators (``control``) reach it."""

    id: str
    address: str
    control: str = ""
    since: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, "address": self.address, "control": self.control, "since": self.since}
        )

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> LeaderRecord | None:
        """The record, or None when there is none or it is not one (never raises)."""
        if not raw:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("address"), str):
            return None
        since = data.get("since")
        return cls(
            str(data.get("id", "")),
            data["address"],
            str(data.get("control") or ""),
            float(since) if isinstance(since, int | float) else 0.0,
        )


class Election(ABC):
    """One coordinator's candidacy. ``campaign`` blocks until it leads.

    While it leads, ``token`` is its fencing token: a number that only grows from
    one leader to the next. ``check`` asks the backend whether the token is still
    the leader's; ``holds`` answers from this process's clock alone (the lease
    cannot have run out yet), for the questions asked too often to ask the backend.

    Attributes:
        lost: set once this candidate knows it no longer leads (until it wins again).
        token: the fencing token while leading, else 0.
    """

    lost: threading.Event
    token: int = 0
    cluster: str = ""  # the cluster's name, for the logs
    # Set when the leader may have changed (a watch): a standby tries again at once.
    changed: threading.Event

    def campaign(
        self,
        record: LeaderRecord,
        stop: threading.Event | None = None,
        tick: Callable[[], None] | None = None,
    ) -> bool:
        """Lead (True), or return False once ``stop`` is set while standing by.
        ``tick`` is called about once a second while standing by (a watchdog).
        ``record`` is published for workers and operators to find the leader."""
        announced = False
        while not (stop is not None and stop.is_set()):
            self.changed.clear()
            try:
                if self._try_to_lead(record):
                    return True
                if not announced:
                    leader = self._leader()
                    log.info(
                        "standing by cluster=%s leader=%s",
                        self.cluster,
                        leader.address if leader else "?",
                    )
                    announced = True
            except Exception as exc:  # the backend away: keep standing by, try again
                self._failed(exc)
                log.warning("cannot campaign error=%s; retrying", type(exc).__name__)
            if tick is not None:
                tick()
            self.changed.wait(1.0)  # a watch on the leader wakes us sooner
        return False

    @abstractmethod
    def _try_to_lead(self, record: LeaderRecord) -> bool:
        """One attempt: True when this candidate now leads (its ``token`` set)."""

    @abstractmethod
    def _leader(self) -> LeaderRecord | None:
        """The leader's record now (for the log of a standby)."""

    # Most backends fail over by themselves
    def _failed(self, exc: BaseException) -> None:  # noqa: B027
        """A call to the backend failed (e.g. move to its next endpoint)."""

    @abstractmethod
    def check(self) -> bool | None:
        """Whether this candidate still leads, asked of the backend now (the fence
        before a commit). True: it does. False: another leads or none does (``lost``
        is set). None: the backend did not answer; commit nothing now."""

    @abstractmethod
    def holds(self) -> bool:
        """Whether the lease surely still lives by this process's own clock: False
        once lost, or a TTL after the last renewal the backend granted."""

    @abstractmethod
    def publish_later(self, path: str, value: str) -> None:
        """Queue a write of ``path`` (relative to the cluster's root, e.g.
        ``jobs/<id>/status``), fenced by the token: written in the background,
        retried while the backend fails, dropped once another leads. A newer value
        for a path replaces a queued one."""

    @abstractmethod
    def step_down(self) -> None:
        """End this term: write what is queued (while still leading), give the lease
        back. ``campaign`` may be called again."""

    @abstractmethod
    def resign(self) -> None:
        """Step down for good and release the backend's connections."""


class JobStore(ABC):
    """Jobs kept where any leader finds them: ``spec`` (JSON, written once),
    ``state`` (the operator's wish: one of ``DESIRED_STATES``) and ``status``
    (the leader's report, written through the election's fenced writer)."""

    def __init__(self, election: Election) -> None:
        self.election = election

    @abstractmethod
    def publish(self, job_id: str, spec: dict[str, Any]) -> bool:
        """Store a spec (and the state ``running``) unless the job exists: a
        compare-and-set. True if stored, False if the job was there already."""

    @abstractmethod
    def jobs(self) -> dict[str, dict[str, bytes]]:
        """Every job: id -> {part: value} for its ``spec``, ``state``, ``status``."""

    @abstractmethod
    def set_state(self, job_id: str, state: str) -> None:
        """Write the operator's wish for a job (raises ``MembershipUnavailable``)."""

    @abstractmethod
    def changes(self, now: float) -> list[tuple[str, str, bytes]]:
        """(job id, part, value) for each ``spec`` or ``state`` written since the last
        call, by anyone; after a lost connection, what is there now (nothing missed)."""

    def write_status(self, job_id: str, status: dict[str, Any]) -> None:
        """Queue the job's status (without its history: values stay small)."""
        compact = {k: v for k, v in status.items() if k != "history"}
        self.election.publish_later(f"jobs/{job_id}/status", json.dumps(compact, default=str))

    def close(self) -> None:  # noqa: B027 - a store with no connection of its own holds nothing
        """Stop watching."""

    @staticmethod
    def check_state(state: str) -> None:
        if state not in DESIRED_STATES:
            raise ValueError(f"desired state must be one of {DESIRED_STATES}, not {state!r}")


class Registration(ABC):
    """A worker's record in the cluster, under a lease kept alive in the background;
    ``close`` removes it at once (a graceful leave). A crashed worker's record goes
    when its lease runs out.

    Attributes:
        leader_changed: set whenever the leader may have changed (the worker then
            asks ``leader`` again).
    """

    leader_changed: threading.Event

    @abstractmethod
    def leader(self) -> LeaderRecord | None:
        """The leader's record; None while none leads. Raises when the backend does
        not answer (a silent backend says nothing about the coordinator)."""

    @abstractmethod
    def close(self) -> None:
        """Remove the record now and release the connection."""


class ClusterBackend(ABC):
    """Where a cluster keeps its members, its leader and its jobs; chosen by the URL's
    scheme. The constructor checks the URL (``ConfigError`` naming the fix) and
    connects to nothing: each service connects when it is made, and raises
    ``MembershipUnavailable`` naming the servers when it cannot.

    Class attributes:
        name: the URL scheme (``zk`` for ``zk://...``), the backend's registry key.
        shared: whether several processes see the same state (False: the embedded
            backend, one coordinator, members known by their heartbeats only).
    """

    name: ClassVar[str]
    shared: ClassVar[bool] = True

    def __init__(self, url: str) -> None:
        if urlsplit(url).scheme != self.name:
            raise ConfigError(f"membership {self.describe_url(url)!r} is not a {self.name}:// URL")
        self.url = url

    @staticmethod
    def describe_url(url: str) -> str:
        """The URL as logs may show it: a password replaced by ``***``."""
        scheme, _, rest = url.partition("://")
        userinfo, at, hosts = rest.partition("@")
        return f"{scheme}://{userinfo.split(':')[0]}:***@{hosts}" if at and ":" in userinfo else url

    def __str__(self) -> str:
        return self.describe_url(self.url)

    @abstractmethod
    def member_table(self, heartbeat_timeout: float) -> MemberTable:
        """The coordinator's member table (connected, watching)."""

    @abstractmethod
    def election(self, coordinator_id: str, ttl: float) -> Election:
        """A coordinator's candidacy under a lease of ``ttl`` seconds."""

    @abstractmethod
    def job_store(self, election: Election) -> JobStore:
        """The job store, its status writes fenced by ``election``."""

    @abstractmethod
    def registration(
        self, worker_id: str, record: dict[str, Any], ttl: float
    ) -> Registration | None:
        """Register a worker under a lease of ``ttl`` seconds; None when this backend
        keeps no registry (the worker is given its coordinator)."""

    @abstractmethod
    def leader(self) -> LeaderRecord | None:
        """The leader's record as the backend holds it now (connects, reads, closes)."""


def backend_class(url: str, backends: Any = None) -> type[ClusterBackend]:
    """The backend class for ``url``'s scheme: from ``backends`` (the plugin manager's
    registry, in daemons), else from the entry points (a client that only asks for
    the leader loads the one of that name first, not every plugin nor torch).
    ``ConfigError`` or ``PluginError`` naming the known schemes when none serves it."""
    scheme = url.partition("://")[0] if "://" in url else ""
    if not scheme:
        raise ConfigError(
            f"membership {url!r} is not a URL; use embedded://, etcd://HOST:2379/CLUSTER or "
            "zk://HOST:2181/CLUSTER"
        )
    if backends is not None:
        cls: type[ClusterBackend] = backends.get(scheme)
        return cls
    from importlib.metadata import entry_points  # noqa: PLC0415

    group = entry_points(group="elastic")
    known: dict[str, type[ClusterBackend]] = {}
    for ep in [*group.select(name=scheme), *(ep for ep in group if ep.name != scheme)]:
        hook = getattr(ep.load(), "elastic_cluster_backends", None)
        known.update({c.name: c for c in (hook() if hook is not None else ())})
        if scheme in known:
            return known[scheme]
    raise PluginError(
        f"unknown cluster backend {scheme!r} (known: {', '.join(sorted(known))}); check "
        "--membership, or install the plugin that provides it"
    )


def open_backend(url: str, backends: Any = None) -> ClusterBackend:
    """The backend for ``url`` (its URL checked; nothing connected yet)."""
    return backend_class(url, backends)(url)


class FencedOutbox:
    """An election's background writer of fenced values (``Election.publish_later``),
    one writer thread per term, whatever the backend: the newest value per path, in
    order of paths, retried each second while the backend fails, dropped once
    another coordinator leads. ``publish(path, value)`` is the backend's fenced
    write: True (written), False (another leads: never), None (the backend failed)."""

    def __init__(self, publish: Callable[[str, str], bool | None], join_timeout: float) -> None:
        self.publish = publish
        self.join_timeout = join_timeout
        self._pending: dict[str, str] = {}
        self._ready = threading.Condition()
        self._over = threading.Event()
        self._writer: threading.Thread | None = None

    def put(self, path: str, value: str) -> None:
        with self._ready:
            self._pending[path] = value
            self._ready.notify()

    def start(self, name: str) -> None:
        """A new term: a writer of its own (an older one ends with its term)."""
        self._over = threading.Event()
        self._writer = threading.Thread(
            target=self._write, args=(self._over,), name=name, daemon=True
        )
        self._writer.start()

    def stop(self, flush: bool) -> None:
        """End the term's writer; with ``flush`` (still leading), write what is
        queued, one try each. No older value may land after ours."""
        self._over.set()
        with self._ready:
            self._ready.notify()
        if self._writer is not None:
            self._writer.join(timeout=self.join_timeout)
        with self._ready:
            pending, self._pending = self._pending, {}
        if flush:
            for path, value in pending.items():
                self.publish(path, value)

    def _write(self, over: threading.Event) -> None:
        retry = False
        while not over.is_set():
            with self._ready:
                if not self._pending or retry:
                    self._ready.wait(1.0)
                pending = dict(self._pending)
            retry = False
            for path, value in pending.items():
                if self.publish(path, value) is None:
                    retry = True
                    break
                with self._ready:
                    if self._pending.get(path) == value:
                        del self._pending[path]
