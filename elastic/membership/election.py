"""Coordinator election over etcd: whoever creates the ``leader`` key leads.

Any number of coordinators may run against one cluster. Each campaigns by creating
``/elastic/<cluster>/leader`` in a transaction that succeeds only if the key does
not exist, under its own lease. The winner publishes its address there and keeps
the lease alive; the others stand by, watching the key, and campaign again when it
is deleted (the leader stopped, or its lease ran out). A leader that cannot renew
its lease within the TTL has lost leadership and must stop serving.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from elastic.errors import ConfigError
from elastic.membership.etcd import (
    Keys,
    connect,
    failed_over,
    parse_etcd_url,
    read_leader,
    retrying,
    revoke,
)

__all__ = ["Leadership"]

log = logging.getLogger("elastic.election")


class Leadership:
    """One coordinator's candidacy. ``campaign`` blocks until it leads."""

    def __init__(self, url: str, coordinator_id: str, ttl: float = 10.0) -> None:
        if ttl < 2:
            raise ConfigError(f"leader lease TTL must be at least 2 s, got {ttl}")
        self.keys = Keys(parse_etcd_url(url)[1])
        self.id = coordinator_id
        self.ttl = int(round(ttl))
        self.client = connect(url)
        self.lease: Any = None
        self.revision = 0  # the leader key's create revision while we lead
        self.lost = threading.Event()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._watch = retrying(self.client, "watching the leader", lambda: self.client.add_watch_callback(self.keys.leader, lambda _response: self._changed.set()))

    def campaign(self, address: str, stop: threading.Event | None = None) -> bool:
        """Lead (True), or return False once ``stop`` is set while standing by."""
        record = json.dumps({"id": self.id, "address": address, "since": time.time()})
        announced = False
        while not (stop is not None and stop.is_set()):
            self._changed.clear()
            try:
                if self._try_to_lead(record, address):
                    return True
                if not announced:
                    leader = read_leader(self.client, self.keys)
                    log.info("standing by cluster=%s leader=%s", self.keys.cluster, leader["address"] if leader else "?")
                    announced = True
            except Exception as exc:  # etcd away: keep standing by, try again
                failed_over(self.client, exc)
                log.warning("cannot campaign error=%s; retrying", type(exc).__name__)
            self._changed.wait(1.0)  # the watch wakes us when the key changes
        return False

    def _try_to_lead(self, record: str, address: str) -> bool:
        """One attempt: create the leader key under a new lease if nobody holds it."""
        lease = self.client.lease(self.ttl)
        tx = self.client.transactions
        won, responses = self.client.transaction(
            compare=[tx.create(self.keys.leader) == 0],
            success=[tx.put(self.keys.leader, record, lease)],
            failure=[],
        )
        if not won:
            lease.revoke()
            return False
        self.lease = lease
        self.revision = responses[0].response_put.header.revision  # our fencing token
        log.info("leading cluster=%s address=%s lease=%x ttl=%ds", self.keys.cluster, address, lease.id, self.ttl)
        threading.Thread(target=self._keep_alive, name="etcd-leader", daemon=True).start()
        return True

    def check(self) -> bool | None:
        """Whether we still lead, asked of etcd now (a fence before every commit).

        True: the leader key is still the one we created. False: it is gone or
        another coordinator's (``lost`` is set). None: etcd did not answer; commit
        nothing now, and the lease decides soon enough.
        """
        if self.lost.is_set():
            return False
        try:
            tx = self.client.transactions
            ok, _ = self.client.transaction(compare=[tx.create(self.keys.leader) == self.revision], success=[], failure=[])
        except Exception as exc:
            log.warning("cannot confirm leadership error=%s; not committing now", type(exc).__name__)
            return None
        if not ok:
            log.error("another coordinator leads cluster=%s: stepping down", self.keys.cluster)
            self.lost.set()
        return bool(ok)

    def publish(self, key: str, value: str) -> bool:
        """Write ``key`` if we still lead (one transaction); False if not written now."""
        try:
            tx = self.client.transactions
            ok, _ = self.client.transaction(compare=[tx.create(self.keys.leader) == self.revision], success=[tx.put(key, value)], failure=[])
        except Exception as exc:
            log.warning("cannot write %s to etcd error=%s; retrying", key, type(exc).__name__)
            return False
        return bool(ok)

    def _keep_alive(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.ttl / 3):
            try:
                responses = self.lease.refresh()
                if responses and responses[0].TTL > 0:
                    renewed = time.monotonic()
                    continue
                log.error("leader lease expired cluster=%s: no longer leading", self.keys.cluster)
            except Exception as exc:
                if time.monotonic() - renewed < self.ttl:
                    log.warning("cannot renew the leader lease error=%s; retrying", type(exc).__name__)
                    continue
                log.error("leader lease not renewed for %ds cluster=%s: no longer leading", self.ttl, self.keys.cluster)
            self.lost.set()
            return

    def resign(self) -> None:
        """Give up leadership at once (the lease is revoked: a standby takes over)."""
        self._stop.set()
        if self.lease is not None and not self.lost.is_set():
            revoke(self.client, self.lease, "leader", self.ttl)
        try:
            self.client.cancel_watch(self._watch)
        except Exception:  # closing anyway
            pass
        self.client.close()
