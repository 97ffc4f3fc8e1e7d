"""The member table the coordinator sees, whatever backend keeps it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Member", "MembershipEvent", "MemberTable", "assign_slot"]


@dataclass
class Member:
    """A worker the coordinator knows.

    ``slot`` is a small stable number given at join: the worker's previous slot when
    it comes back and that slot is still free, else the lowest free one. It picks the
    worker's data shard, so a worker that re-joins after a blip keeps its data.
    """

    id: str
    host: str = ""
    device: str = "cpu"
    software: str = ""
    pid: int = 0
    slot: int = 0
    joined_at: float = 0.0
    last_seen: float = 0.0
    busy: bool = False
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MembershipEvent:
    """A change in membership, delivered to the coordinator's event loop."""

    kind: Literal["joined", "left"]
    member: Member
    reason: str


def assign_slot(member: Member, taken: set[int], previous: dict[str, int]) -> None:
    """Give ``member`` its previous slot if free (so it keeps its data shard), else the
    lowest free one; remember it in ``previous``."""
    slot = previous.get(member.id)
    member.slot = (
        slot
        if slot is not None and slot not in taken
        else next(i for i in range(len(taken) + 1) if i not in taken)
    )
    previous[member.id] = member.slot


class MemberTable(ABC):
    """Keeps the member table and says when members join and leave (a cluster
    backend's ``member_table``).

    The coordinator's single event loop calls every method; ``poll`` hands over the
    events that happened since the last call (including members found dead), so a
    table that watches something in another thread only has to queue them.
    """

    def __init__(self, heartbeat_timeout: float) -> None:
        self.heartbeat_timeout = heartbeat_timeout

    @abstractmethod
    def join(self, member: Member, now: float) -> Member:
        """Add (or refresh) a member; returns it with its slot assigned."""

    @abstractmethod
    def heartbeat(self, member_id: str, now: float, busy: bool = False) -> bool:
        """Note a sign of life. False if the member is unknown (it must join again)."""

    @abstractmethod
    def leave(self, member_id: str, reason: str) -> None:
        """Remove a member now (graceful leave, or the coordinator gave up on it)."""

    @abstractmethod
    def members(self) -> list[Member]:
        """The live members, by slot."""

    @abstractmethod
    def poll(self, now: float) -> list[MembershipEvent]:
        """Events since the last call, after removing members whose time ran out."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (connections, threads)."""
