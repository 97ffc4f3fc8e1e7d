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
from elastic.membership.base import Member, MembershipEvent, MemberTable, assign_slot
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

__all__ = ["EtcdMemberTable", "EtcdRegistration"]

log = logging.getLogger("elastic.etcd")


class EtcdMemberTable(MemberTable):
    """The coordinator's view: members are workers with a live record and a HELLO."""

    def __init__(self, url: str, heartbeat_timeout: float = 3.0) -> None:
        super().__init__(heartbeat_timeout)
        self.keys = Keys(parse_etcd_url(url)[1])
        self.client = connect(url)
        self._records: dict[str, dict[str, Any]] = {}  # worker id -> record, from etcd
        self._connected: dict[str, Member] = {}  # worker id -> member, from HELLO
        self._active: set[str] = set()  # both: reported as joined
        self._events: list[MembershipEvent] = []
        self._last_slot: dict[str, int] = {}
        # Slots survive a failover: a worker keeps its data shard under the next leader.
        for value, meta in retrying(self.client, "reading slots", lambda: list(self.client.get_prefix(self.keys.slots))):
            if value.isdigit():
                self._last_slot[meta.key.decode("utf-8", "replace")[len(self.keys.slots) :]] = int(value)
        self._watch = PrefixWatch(self.client, self.keys.members)

    # ------------------------------------------------------------ interface --

    def join(self, member: Member, now: float) -> Member:
        self._apply_changes(now)
        known = self._connected.get(member.id)
        if known is not None:
            known.last_seen = now
            return known
        before = self._last_slot.get(member.id)
        assign_slot(member, {m.slot for m in self._connected.values()}, self._last_slot)
        if member.slot != before:
            try:
                self.client.put(self.keys.slots + member.id, str(member.slot))
            except Exception as exc:  # only the next leader's shard choice depends on it
                log.warning("cannot record the slot in etcd worker=%s error=%s", member.id, type(exc).__name__)
        member.joined_at = member.last_seen = now
        self._connected[member.id] = member
        self._update(member.id, "hello")
        return member

    def heartbeat(self, member_id: str, now: float, busy: bool = False) -> bool:
        member = self._connected.get(member_id)
        if member is None:
            return False
        member.last_seen, member.busy = now, busy
        return True

    def leave(self, member_id: str, reason: str) -> None:
        if self._connected.pop(member_id, None) is not None:
            self._update(member_id, reason)
        if reason == "bye" and self._last_slot.pop(member_id, None) is not None:
            # It left on purpose: its slot is free for good (a crashed worker keeps its
            # slot, so it gets its shard back when it returns).
            try:
                self.client.delete(self.keys.slots + member_id)
            except Exception as exc:  # a stale slot only makes a returning worker's shard sticky
                log.warning("cannot delete the slot in etcd worker=%s error=%s", member_id, type(exc).__name__)

    def members(self) -> list[Member]:
        return sorted((self._connected[i] for i in self._active), key=lambda m: m.slot)

    def poll(self, now: float) -> list[MembershipEvent]:
        self._apply_changes(now)
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        self._watch.close()
        self.client.close()

    # -------------------------------------------------------------- helpers --

    def _apply_changes(self, now: float) -> None:
        for worker, value in self._watch.changes(now):
            if value is None:
                if self._records.pop(worker, None) is not None:
                    self._update(worker, "lease ended (stopped, or silent for its TTL)")
                continue
            try:
                record = json.loads(value)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                log.warning("ignoring a malformed member record worker=%s error=%s", worker, exc)
                continue
            self._records[worker] = record
            self._update(worker, "registered")

    def _update(self, worker: str, reason: str) -> None:
        """Report a join or leave when the member's two halves change together."""
        member = self._connected.get(worker)
        live = member is not None and worker in self._records
        if live and worker not in self._active:
            assert member is not None
            record = self._records[worker]
            member.device = str(record.get("device", member.device))
            self._active.add(worker)
            self._events.append(MembershipEvent("joined", member, reason))
        elif not live and worker in self._active:
            self._active.discard(worker)
            gone = member or Member(id=worker)
            self._events.append(MembershipEvent("left", gone, reason))
            if member is not None and worker not in self._records:
                self._connected.pop(worker, None)  # its lease is gone: it must HELLO again


class EtcdRegistration(Registration):
    """A worker's record in etcd, under a lease it keeps alive from a thread.

    ``close()`` revokes the lease, so the record disappears at once. If the lease is
    lost anyway (etcd unreachable for longer than the TTL), a new one is granted and
    the record written again as soon as etcd answers.
    """

    def __init__(self, url: str, worker_id: str, record: dict[str, Any], ttl: float = 10.0) -> None:
        if ttl < 2:
            raise ConfigError(f"lease TTL must be at least 2 s, got {ttl}")
        self.keys = Keys(parse_etcd_url(url)[1])
        self.key = self.keys.member(worker_id)
        self.record = json.dumps(record, sort_keys=True)
        self.ttl = int(round(ttl))
        self.client = connect(url)
        self._lease: Any = None
        self._stop = threading.Event()
        self.leader_changed = threading.Event()  # set by the watch on the leader key
        self._leader_watch_broken = threading.Event()
        self._leader_watch = retrying(self.client, "watching the leader", lambda: self.client.add_watch_callback(self.keys.leader, self._on_leader_watch))
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
                    self._leader_watch = self.client.add_watch_callback(self.keys.leader, self._on_leader_watch)
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
