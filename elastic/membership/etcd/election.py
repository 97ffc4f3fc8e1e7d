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
from typing import Any

from elastic.errors import ConfigError
from elastic.membership.cluster import Election, FencedOutbox, LeaderRecord
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
        self.keys = Keys(parse_etcd_url(url).cluster)
        self.id = coordinator_id
        self.ttl = int(round(ttl))
        self.client = connect(url)
        self.lease: Any = None
        self.token = 0  # the leader key's create revision while we lead
        # When the last renewal that etcd granted was sent (monotonic): the lease
        # lives at least a TTL from then, whatever happened to this process since.
        self.renewed_at = float("-inf")
        self.lost = threading.Event()
        self.changed = threading.Event()
        self.cluster = self.keys.cluster
        self._term_over = threading.Event()  # ends this term's keep-alive
        self._outbox = FencedOutbox(self.publish, 2 * RPC_TIMEOUT)
        self._watch = retrying(
            self.client,
            "watching the leader",
            lambda: self.client.add_watch_callback(
                self.keys.leader, lambda _response: self.changed.set()
            ),
        )

    def _leader(self) -> LeaderRecord | None:
        return read_leader(self.client, self.keys)

    def _failed(self, exc: BaseException) -> None:
        failed_over(self.client, exc)

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
        log.info(
            "leading cluster=%s address=%s lease=%x ttl=%ds",
            self.keys.cluster,
            record.address,
            lease.id,
            self.ttl,
        )
        self.renewed_at = asked
        self.lost.clear()
        self._term_over = threading.Event()
        threading.Thread(
            target=self._keep_alive, args=(lease, self._term_over), name="etcd-leader", daemon=True
        ).start()
        self._outbox.start("etcd-publish")
        return True

    def check(self) -> bool | None:
        """True while the leader key is still the one we created (its create
        revision is our token)."""
        if self.lost.is_set():
            return False
        try:
            tx = self.client.transactions
            ok, _ = self.client.transaction(
                compare=[tx.create(self.keys.leader) == self.token], success=[], failure=[]
            )
        except Exception as exc:
            log.warning(
                "cannot confirm leadership error=%s; not committing now", type(exc).__name__
            )
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
            ok, _ = self.client.transaction(
                compare=[tx.create(self.keys.leader) == self.token],
                success=[tx.put(key, value)],
                failure=[],
            )
        except Exception as exc:
            log.warning("cannot write %s to etcd error=%s; retrying", key, type(exc).__name__)
            return None
        return bool(ok)

    def publish_later(self, path: str, value: str) -> None:
        self._outbox.put(path, value)

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
                    log.warning(
                        "cannot renew the leader lease error=%s; retrying", type(exc).__name__
                    )
                    continue
                log.error(
                    "leader lease not renewed for %ds cluster=%s: no longer leading",
                    self.ttl,
                    self.keys.cluster,
                )
            if not term_over.is_set():  # a later term is not this thread's to end
                self.lost.set()
            return

    def step_down(self) -> None:
        """End this term: stop its threads, write what is still queued (one try each,
        while we lead), and give the lease back (at once if etcd answers, else it runs
        out). Campaign again to lead."""
        self._term_over.set()
        self._outbox.stop(flush=not self.lost.is_set())
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
