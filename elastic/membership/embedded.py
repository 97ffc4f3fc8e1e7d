"""The embedded backend: one coordinator keeps everything in its own memory.

For one machine or a small cluster without etcd or ZooKeeper. Workers prove they are
alive with heartbeats over the data connection; one that is silent for
``heartbeat_timeout`` seconds is removed and the event reaches the round engine on
the next poll. There is one coordinator, so it leads from the start and nothing can
depose it; its jobs live as long as it does (its checkpoints outlive it).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from elastic.hookspecs import hookimpl
from elastic.membership.base import Member, MembershipEvent, MemberTable, assign_slot
from elastic.membership.cluster import ClusterBackend, Election, JobStore, LeaderRecord

__all__ = ["EmbeddedBackend", "EmbeddedMemberTable", "SoleElection", "MemoryJobStore"]


class EmbeddedMemberTable(MemberTable):
    """In-memory member table with heartbeat expiry."""

    def __init__(self, heartbeat_timeout: float = 3.0) -> None:
        super().__init__(heartbeat_timeout)
        self._members: dict[str, Member] = {}
        self._events: list[MembershipEvent] = []
        self._last_slot: dict[str, int] = {}  # a worker that comes back gets its shard back
        # The loop asks for the members and polls for the silent ones on every turn;
        # with hundreds of workers neither may cost O(members) each time.
        self._sorted: list[Member] | None = None  # members by slot, until one joins or leaves
        self._next_scan = float("-inf")

    def join(self, member: Member, now: float) -> Member:
        known = self._members.get(member.id)
        if known is not None:
            known.last_seen = now
            return known
        assign_slot(member, {m.slot for m in self._members.values()}, self._last_slot)
        member.joined_at = member.last_seen = now
        self._members[member.id] = member
        self._sorted = None
        self._events.append(MembershipEvent("joined", member, "hello"))
        return member

    def heartbeat(self, member_id: str, now: float, busy: bool = False) -> bool:
        member = self._members.get(member_id)
        if member is None:
            return False
        member.last_seen = now
        member.busy = busy
        return True

    def leave(self, member_id: str, reason: str) -> None:
        member = self._members.pop(member_id, None)
        if member is not None:
            self._sorted = None
            self._events.append(MembershipEvent("left", member, reason))
        if reason == "bye":  # it left on purpose: its slot is free for good
            self._last_slot.pop(member_id, None)

    def members(self) -> list[Member]:
        if self._sorted is None:
            self._sorted = sorted(self._members.values(), key=lambda m: m.slot)
        return list(self._sorted)

    def poll(self, now: float) -> list[MembershipEvent]:
        if (
            now >= self._next_scan
        ):  # silence is measured in seconds: a scan every tenth of the timeout will do
            self._next_scan = now + self.heartbeat_timeout / 10
            for member in list(self._members.values()):
                if now - member.last_seen > self.heartbeat_timeout:
                    silent = now - member.last_seen
                    self.leave(member.id, f"no heartbeat for {silent:.1f}s")
        events, self._events = self._events, []
        return events


class SoleElection(Election):
    """The one coordinator leads at once, for good: its token is 1, every check passes."""

    def __init__(self) -> None:
        self.lost = threading.Event()
        self.changed = threading.Event()
        self.token = 0

    def _try_to_lead(self, record: LeaderRecord) -> bool:
        self.token = 1
        self.lost.clear()
        return True

    def _leader(self) -> LeaderRecord | None:
        return None

    def check(self) -> bool | None:
        return not self.lost.is_set()

    def holds(self) -> bool:
        return not self.lost.is_set()

    def publish_later(self, path: str, value: str) -> None:
        """Nobody else reads it."""

    def step_down(self) -> None:
        self.token = 0
        self.lost.set()

    def resign(self) -> None:
        self.step_down()


class MemoryJobStore(JobStore):
    """The jobs of this coordinator, in its memory: nobody else writes them."""

    def __init__(self, election: Election) -> None:
        super().__init__(election)
        self._jobs: dict[str, dict[str, bytes]] = {}

    def publish(self, job_id: str, spec: dict[str, Any]) -> bool:
        if job_id in self._jobs:
            return False
        self._jobs[job_id] = {"spec": json.dumps(spec).encode(), "state": b"running"}
        return True

    def jobs(self) -> dict[str, dict[str, bytes]]:
        return {job_id: dict(parts) for job_id, parts in self._jobs.items()}

    def set_state(self, job_id: str, state: str) -> None:
        self.check_state(state)
        self._jobs.setdefault(job_id, {})["state"] = state.encode()

    def changes(self, now: float) -> list[tuple[str, str, bytes]]:
        return []

    def write_status(self, job_id: str, status: dict[str, Any]) -> None:
        """The status file is where it is read (no copy to serialise)."""


class EmbeddedBackend(ClusterBackend):
    name = "embedded"
    shared = False

    def member_table(self, heartbeat_timeout: float) -> EmbeddedMemberTable:
        return EmbeddedMemberTable(heartbeat_timeout)

    def election(self, coordinator_id: str, ttl: float) -> SoleElection:
        return SoleElection()

    def job_store(self, election: Election) -> MemoryJobStore:
        return MemoryJobStore(election)

    def registration(self, worker_id: str, record: dict[str, Any], ttl: float) -> None:
        return None  # workers are told where the coordinator is (--coordinator)

    def leader(self) -> LeaderRecord | None:
        return None  # known to this process only


@hookimpl
def elastic_cluster_backends() -> list[type]:
    return [EmbeddedBackend]
