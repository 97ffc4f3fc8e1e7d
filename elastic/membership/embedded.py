"""The embedded backend: the coordinator keeps the member table in memory.

For one machine or a small cluster without etcd. Workers prove they are alive with
heartbeats over the data connection; one that is silent for ``heartbeat_timeout``
seconds is removed and the event reaches the round engine on the next poll.
"""

from __future__ import annotations

from elastic.hookspecs import hookimpl
from elastic.membership.base import Member, MembershipBackend, MembershipEvent, assign_slot

__all__ = ["EmbeddedMembership"]


class EmbeddedMembership(MembershipBackend):
    """In-memory member table with heartbeat expiry."""

    name = "embedded"

    def __init__(self, url: str = "embedded://", heartbeat_timeout: float = 3.0) -> None:
        super().__init__(url, heartbeat_timeout)
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

    def members(self) -> list[Member]:
        if self._sorted is None:
            self._sorted = sorted(self._members.values(), key=lambda m: m.slot)
        return list(self._sorted)

    def poll(self, now: float) -> list[MembershipEvent]:
        if now >= self._next_scan:  # silence is measured in seconds: a scan every tenth of the timeout will do
            self._next_scan = now + self.heartbeat_timeout / 10
            for member in list(self._members.values()):
                if now - member.last_seen > self.heartbeat_timeout:
                    silent = now - member.last_seen
                    self.leave(member.id, f"no heartbeat for {silent:.1f}s")
        events, self._events = self._events, []
        return events


@hookimpl
def elastic_membership_backends() -> list[type]:
    return [EmbeddedMembership]
