"""The member table of a shared cluster, written once for every backend.

A worker is a member once it has both halves: a record in the cluster (written by
its own ``Registration``, under its lease) and a connection to this coordinator (its
HELLO). Neither may race ahead of the other: a record without a HELLO is a worker
starting up; a HELLO without a record is one whose lease ended. A backend supplies
only how records are watched (``_watch``: the records present now, or changes) and
how slots are kept (``_store_slot``), so a new leader gives each returning worker
its data shard back.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any

from elastic.membership.base import Member, MembershipEvent, MemberTable, assign_slot

__all__ = ["RegisteredMemberTable"]

log = logging.getLogger("elastic.membership")


class RegisteredMemberTable(MemberTable):
    """Members are workers with a live record and a HELLO."""

    def __init__(self, heartbeat_timeout: float, slots: dict[str, int]) -> None:
        super().__init__(heartbeat_timeout)
        self._records: dict[str, dict[str, Any]] = {}  # worker id -> record, from the cluster
        self._connected: dict[str, Member] = {}  # worker id -> member, from HELLO
        self._active: set[str] = set()  # both: reported as joined
        self._events: list[MembershipEvent] = []
        self._last_slot = dict(slots)  # as the last leader gave them

    # ------------------------------------------------------- what a backend gives --

    @abstractmethod
    def _watch(self, now: float) -> list[tuple[str, dict[str, Any] | None]]:
        """(worker, its record, or None when its record went) for each change since
        the last call; read in the background, handed over here."""

    @abstractmethod
    def _store_slot(self, worker: str, slot: int | None) -> None:
        """Keep a worker's slot in the cluster (None: forget it). A failure only
        costs a returning worker its shard under the next leader: log it, go on."""

    # ------------------------------------------------------------ interface --

    def join(self, member: Member, now: float) -> Member:
        self._apply(now)
        known = self._connected.get(member.id)
        if known is not None:
            known.last_seen = now
            return known
        before = self._last_slot.get(member.id)
        assign_slot(member, {m.slot for m in self._connected.values()}, self._last_slot)
        if member.slot != before:
            self._store_slot(member.id, member.slot)
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
            self._store_slot(member_id, None)

    def members(self) -> list[Member]:
        return sorted((self._connected[i] for i in self._active), key=lambda m: m.slot)

    def poll(self, now: float) -> list[MembershipEvent]:
        self._apply(now)
        events, self._events = self._events, []
        return events

    # -------------------------------------------------------------- helpers --

    def _apply(self, now: float) -> None:
        for worker, record in self._watch(now):
            if record is None:
                if self._records.pop(worker, None) is not None:
                    self._update(worker, "lease ended (stopped, or silent for its TTL)")
            elif worker not in self._records:
                self._records[worker] = record
                self._update(worker, "registered")
            else:
                self._records[worker] = record

    def _update(self, worker: str, reason: str) -> None:
        """Report a join or leave when the member's two halves change together."""
        member = self._connected.get(worker)
        live = member is not None and worker in self._records
        if live and worker not in self._active:
            assert member is not None
            member.device = str(self._records[worker].get("device", member.device))
            self._active.add(worker)
            self._events.append(MembershipEvent("joined", member, reason))
        elif not live and worker in self._active:
            self._active.discard(worker)
            self._events.append(MembershipEvent("left", member or Member(id=worker), reason))
            if member is not None and worker not in self._records:
                self._connected.pop(worker, None)  # its lease is gone: it must HELLO again
