"""Members in etcd: a worker's record under its lease (``EtcdRegistration``), and the
coordinator's table of them (``EtcdMemberTable``).

A worker registers itself under a lease with a TTL and keeps the lease alive; a
graceful stop revokes it, so its record disappears at once, and a crash is noticed
when the lease runs out. The coordinator watches ``members/`` and never polls. A
member takes part in rounds once it has both a record in etcd and a connection (its
HELLO), so neither may race ahead of the other.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from elastic.errors import ConfigError
from elastic.membership.cluster import LeaderRecord, Registration
from elastic.membership.etcd.client import (
    Keys,
    PrefixWatch,
    connect,
    failed_over,
    parse_etcd_url,
    read_leader,
    retrying,
    revoke,
)
from elastic.membership.registered import RegisteredMemberTable

__all__ = ["EtcdMemberTable", "EtcdRegistration"]

log = logging.getLogger("elastic.etcd")


class EtcdMemberTable(RegisteredMemberTable):
    """Records under ``members/``, watched; slots under ``slots/``."""

    def __init__(self, url: str, heartbeat_timeout: float = 3.0) -> None:
        self.keys = Keys(parse_etcd_url(url).cluster)
        self.client = connect(url)
        slots = {}
        for value, meta in retrying(
            self.client, "reading slots", lambda: list(self.client.get_prefix(self.keys.slots))
        ):
            if value.isdigit():
                slots[meta.key.decode("utf-8", "replace")[len(self.keys.slots) :]] = int(value)
        super().__init__(heartbeat_timeout, slots)
        self._changes = PrefixWatch(self.client, self.keys.members)

    def _watch(self, now: float) -> list[tuple[str, dict[str, Any] | None]]:
        out: list[tuple[str, dict[str, Any] | None]] = []
        for worker, value in self._changes.changes(now):
            if value is None:
                out.append((worker, None))
                continue
            try:
                record = json.loads(value)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                log.warning("ignoring a malformed member record worker=%s error=%s", worker, exc)
                continue
            out.append((worker, record))
        return out

    def _store_slot(self, worker: str, slot: int | None) -> None:
        try:
            if slot is None:
                self.client.delete(self.keys.slots + worker)
            else:
                self.client.put(self.keys.slots + worker, str(slot))
        except Exception as exc:  # only the next leader's shard choice depends on it
            log.warning(
                "cannot record the slot in etcd worker=%s error=%s", worker, type(exc).__name__
            )

    def close(self) -> None:
        self._changes.close()
        self.client.close()


class EtcdRegistration(Registration):
    """A worker's record in etcd, under a lease it keeps alive from a thread.

    ``close()`` revokes the lease, so the record disappears at once. If the lease is
    lost anyway (etcd unreachable for longer than the TTL), a new one is granted and
    the record written again as soon as etcd answers.
    """

    def __init__(self, url: str, worker_id: str, record: dict[str, Any], ttl: float = 10.0) -> None:
        if ttl < 2:
            raise ConfigError(f"lease TTL must be at least 2 s, got {ttl}")
        self.keys = Keys(parse_etcd_url(url).cluster)
        self.key = self.keys.member(worker_id)
        self.record = json.dumps(record, sort_keys=True)
        self.ttl = int(round(ttl))
        self.client = connect(url)
        self._lease: Any = None
        self._stop = threading.Event()
        self.leader_changed = threading.Event()  # set by the watch on the leader key
        self._leader_watch_broken = threading.Event()
        self._leader_watch = retrying(
            self.client,
            "watching the leader",
            lambda: self.client.add_watch_callback(self.keys.leader, self._on_leader_watch),
        )
        retrying(self.client, "registering", self._register)
        self._thread = threading.Thread(target=self._keep_alive, name="etcd-lease", daemon=True)
        self._thread.start()

    def _on_leader_watch(self, response: Any) -> None:
        if isinstance(response, Exception):
            self._leader_watch_broken.set()  # the keep-alive thread watches again
        else:
            self.leader_changed.set()

    def leader(self) -> LeaderRecord | None:
        return read_leader(self.client, self.keys)

    def _register(self) -> None:
        self._lease = self.client.lease(self.ttl)
        self.client.put(self.key, self.record, lease=self._lease)
        log.info("registered in etcd key=%s lease=%x ttl=%ds", self.key, self._lease.id, self.ttl)

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if self._leader_watch_broken.is_set():
                    self._leader_watch = self.client.add_watch_callback(
                        self.keys.leader, self._on_leader_watch
                    )
                    self._leader_watch_broken.clear()
                    self.leader_changed.set()  # it may have changed while we were not watching
                responses = self._lease.refresh()
                if not responses or responses[0].TTL <= 0:  # expired while we were cut off
                    log.warning("etcd lease expired; registering again key=%s", self.key)
                    self._register()
            except Exception as exc:
                failed_over(self.client, exc)
                log.warning("cannot refresh the etcd lease error=%s; retrying", type(exc).__name__)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.client.cancel_watch(self._leader_watch)
        except Exception:  # closing anyway
            pass
        revoke(self.client, self._lease, "worker", self.ttl)
        self.client.close()
