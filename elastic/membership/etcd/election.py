"""Coordinator election over etcd (``EtcdElection``): whoever creates the ``leader``
key leads; the key's create revision is the fencing token.

Any number of coordinators may run against one cluster. Each campaigns by creating
``/elastic/<cluster>/leader`` in a transaction that succeeds only if the key does
not exist, under its own lease. The winner publishes its address there and keeps
the lease alive; the others stand by, watching the key, and campaign again when it
is deleted (the leader stopped, or its lease ran out). A leader that cannot renew
its lease within the TTL has lost leadership: it stops serving, ``step_down()``,
and may campaign again as a standby.

Each term (from winning to stepping down) has its own lease and two threads: one
keeps the lease alive, one writes what the leader publishes in the background
(status, rendezvous generation), each write fenced by the term's revision, so a
silent etcd never blocks the coordinator's event loop on them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from elastic.errors import ConfigError
from elastic.membership.cluster import Election, LeaderRecord
from elastic.membership.etcd.client import (
    RPC_TIMEOUT,
    Keys,
    connect,
    failed_over,
    parse_etcd_url,
    read_leader,
    retrying,
    revoke,
)

__all__ = ["EtcdElection"]

log = logging.getLogger("elastic.election")


class EtcdElection(Election):
    """One coordinator's candidacy. ``campaign`` blocks until it leads."""

    def __init__(self, url: str, coordinator_id: str, ttl: float = 10.0) -> None:
        if ttl < 2:
            raise ConfigError(f"leader lease TTL must be at least 2 s, got {ttl}")
        self.keys = Keys(parse_etcd_url(url)[1])
        self.id = coordinator_id
        self.ttl = int(round(ttl))
        self.client = connect(url)
        self.lease: Any = None
        self.token = 0  # the leader key's create revision while we lead
        # When the last renewal that etcd granted was sent (monotonic): the lease
        # lives at least a TTL from then, whatever happened to this process since.
        self.renewed_at = float("-inf")
        self.lost = threading.Event()
        self._changed = threading.Event()
        self._term_over = threading.Event()  # ends this term's threads
        self._outbox: dict[str, str] = {}  # key -> newest value to write, fenced
        self._outbox_ready = threading.Condition()
        self._writer: threading.Thread | None = None
        self._watch = retrying(self.client, "watching the leader", lambda: self.client.add_watch_callback(self.keys.leader, lambda _response: self._changed.set()))

    def campaign(self, record: LeaderRecord, stop: threading.Event | None = None, tick: Callable[[], None] | None = None) -> bool:
        announced = False
        while not (stop is not None and stop.is_set()):
            self._changed.clear()
            try:
                if self._try_to_lead(record):
                    return True
                if not announced:
                    leader = read_leader(self.client, self.keys)
                    log.info("standing by cluster=%s leader=%s", self.keys.cluster, leader.address if leader else "?")
                    announced = True
            except Exception as exc:  # etcd away: keep standing by, try again
                failed_over(self.client, exc)
                log.warning("cannot campaign error=%s; retrying", type(exc).__name__)
            if tick is not None:
                tick()
            self._changed.wait(1.0)  # the watch wakes us when the key changes
        return False

    def _try_to_lead(self, record: LeaderRecord) -> bool:
        """One attempt: create the leader key under a new lease if nobody holds it."""
        asked = time.monotonic()
        lease = self.client.lease(self.ttl)
        tx = self.client.transactions
        won, responses = self.client.transaction(
            compare=[tx.create(self.keys.leader) == 0],
            success=[tx.put(self.keys.leader, record.to_json(), lease)],
            failure=[],
        )
        if not won:
            lease.revoke()
            return False
        self.lease = lease
        self.token = responses[0].response_put.header.revision  # our fencing token
        log.info("leading cluster=%s address=%s lease=%x ttl=%ds", self.keys.cluster, record.address, lease.id, self.ttl)
        self.renewed_at = asked
        self.lost.clear()
        self._term_over = threading.Event()
        threading.Thread(target=self._keep_alive, args=(lease, self._term_over), name="etcd-leader", daemon=True).start()
        self._writer = threading.Thread(target=self._write_outbox, args=(self._term_over,), name="etcd-publish", daemon=True)
        self._writer.start()
        return True

    def check(self) -> bool | None:
        """True while the leader key is still the one we created (its create
        revision is our token)."""
        if self.lost.is_set():
            return False
        try:
            tx = self.client.transactions
            ok, _ = self.client.transaction(compare=[tx.create(self.keys.leader) == self.token], success=[], failure=[])
        except Exception as exc:
            log.warning("cannot confirm leadership error=%s; not committing now", type(exc).__name__)
            return None
        if not ok:
            log.error("another coordinator leads cluster=%s: stepping down", self.keys.cluster)
            self.lost.set()
        return bool(ok)

    def publish(self, path: str, value: str) -> bool | None:
        """Write ``path`` if we still lead (one transaction). True: written; False:
        another coordinator leads (not written, never will be); None: etcd failed."""
        key = self.keys.path(path)
        try:
            tx = self.client.transactions
            ok, _ = self.client.transaction(compare=[tx.create(self.keys.leader) == self.token], success=[tx.put(key, value)], failure=[])
        except Exception as exc:
            log.warning("cannot write %s to etcd error=%s; retrying", key, type(exc).__name__)
            return None
        return bool(ok)

    def publish_later(self, path: str, value: str) -> None:
        """Written in order of paths by this term's writer thread, retried each
        second while etcd fails, dropped once another coordinator leads."""
        with self._outbox_ready:
            self._outbox[path] = value
            self._outbox_ready.notify()

    def _write_outbox(self, term_over: threading.Event) -> None:
        retry = False
        while not term_over.is_set():
            with self._outbox_ready:
                if not self._outbox or retry:
                    self._outbox_ready.wait(1.0)
                pending = dict(self._outbox)
            retry = False
            for key, value in pending.items():
                written = self.publish(key, value)
                if written is None:
                    retry = True
                    break
                with self._outbox_ready:
                    if self._outbox.get(key) == value:
                        del self._outbox[key]

    def holds(self) -> bool:
        """A process stopped (SIGSTOP, a stalled VM) for longer than the lease wakes
        up believing it leads while another coordinator does: this is what it must
        ask before acting."""
        return not self.lost.is_set() and time.monotonic() - self.renewed_at < self.ttl

    def _keep_alive(self, lease: Any, term_over: threading.Event) -> None:
        while not term_over.wait(self.ttl / 3):
            try:
                asked = time.monotonic()
                responses = lease.refresh()
                if responses and responses[0].TTL > 0:
                    if not term_over.is_set():  # a later term keeps its own time
                        self.renewed_at = asked
                    continue
                log.error("leader lease expired cluster=%s: no longer leading", self.keys.cluster)
            except Exception as exc:
                if time.monotonic() - self.renewed_at < self.ttl:
                    log.warning("cannot renew the leader lease error=%s; retrying", type(exc).__name__)
                    continue
                log.error("leader lease not renewed for %ds cluster=%s: no longer leading", self.ttl, self.keys.cluster)
            if not term_over.is_set():  # a later term is not this thread's to end
                self.lost.set()
            return

    def step_down(self) -> None:
        """End this term: stop its threads, write what is still queued (one try each,
        while we lead), and give the lease back (at once if etcd answers, else it runs
        out). Campaign again to lead."""
        self._term_over.set()
        with self._outbox_ready:
            self._outbox_ready.notify()
        if self._writer is not None:
            self._writer.join(timeout=2 * RPC_TIMEOUT)  # no older value may land after ours
        with self._outbox_ready:
            pending, self._outbox = self._outbox, {}
        if not self.lost.is_set():
            for key, value in pending.items():
                self.publish(key, value)
        if self.lease is not None:
            if self.lost.is_set():  # most likely gone already: make sure, quietly
                with contextlib.suppress(Exception):
                    self.client.revoke_lease(self.lease.id)
            else:
                revoke(self.client, self.lease, "leader", self.ttl)
        self.lease, self.token = None, 0
        self.lost.set()

    def resign(self) -> None:
        """Give up leadership for good and close the client (a standby takes over)."""
        self.step_down()
        try:
            self.client.cancel_watch(self._watch)
        except Exception:  # closing anyway
            pass
        self.client.close()
