"""Admission of big updates: the coordinator's memory stays O(model), not O(workers).

A worker whose update is big (``OFFER_MIN_BYTES`` in ``elastic.wire.header``) first
OFFERs it (its size, in a few bytes) and sends it when GRANTed. libzmq reads every
message it is sent into memory, whether or not the coordinator is ready to fold it: 64
workers finishing a round together would otherwise put 64 model-sized updates in the
coordinator's memory at once. The gate grants offers first come, first served, while
the bytes granted and not yet received fit in a window, and always grants one when
nothing is in flight, so an update bigger than the window still goes, alone.

A grant ends when its update arrives (or is refused), when its worker leaves, or when
it is not used within ``grant_timeout``; each end may admit the next offers.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from elastic.wire.parts import Segment, nbytes

__all__ = ["Offer", "Part", "UploadGate", "UploadStream"]


@dataclass(frozen=True)
class Offer:
    peer: str
    job: str
    key: str
    nbytes: int

    @property
    def slot(self) -> tuple[str, str]:
        """A worker has one offer per job at a time (its newest result)."""
        return self.peer, self.job


class UploadGate:
    """Which offered updates may be sent now. Not thread-safe: the event loop owns it."""

    def __init__(self, window_bytes: int, grant_timeout: float = 30.0) -> None:
        if window_bytes < 0:
            raise ValueError(f"window_bytes must be >= 0, got {window_bytes}")
        self.window = window_bytes
        self.grant_timeout = grant_timeout
        # (peer, job) -> its offer, oldest first; granted ones with their deadline
        self.waiting: OrderedDict[tuple[str, str], Offer] = OrderedDict()
        self.granted: dict[tuple[str, str], tuple[Offer, float]] = {}
        self.peak_bytes = 0  # the most ever granted at once

    @property
    def in_flight(self) -> int:
        return sum(offer.nbytes for offer, _ in self.granted.values())

    def offer(self, peer: str, job: str, key: str, nbytes: int, now: float) -> list[Offer]:
        """A worker offers an update of ``job``; returns the offers granted now (maybe
        its own).

        A worker has one offer per job at a time: a new one replaces what it offered
        of that job before (granted or not), since it only offers its newest result.
        Its offers of other jobs (a worker may serve several) stand.
        """
        offer = Offer(peer, job, key, nbytes)
        self.waiting.pop(offer.slot, None)
        self.granted.pop(offer.slot, None)
        self.waiting[offer.slot] = offer
        return self._admit(now)

    def done(self, peer: str, now: float, key: str | None = None) -> list[Offer]:
        """``peer``'s update ``key`` arrived or was refused, or (no ``key``) ``peer``
        left: its bytes are free. An update that was not offered (a small one)
        frees nothing."""
        for slot, offer in list(self.waiting.items()):
            if offer.peer == peer and (key is None or offer.key == key):
                del self.waiting[slot]
        for slot, (offer, _) in list(self.granted.items()):
            if offer.peer == peer and (key is None or offer.key == key):
                del self.granted[slot]
        return self._admit(now)

    def expire(self, now: float) -> list[Offer]:
        """Grants unused past their deadline end (a worker frozen after its offer)."""
        for slot in [s for s, (_, deadline) in self.granted.items() if deadline <= now]:
            del self.granted[slot]
        return self._admit(now)

    def _admit(self, now: float) -> list[Offer]:
        admitted = []
        while self.waiting:
            offer = next(iter(self.waiting.values()))
            if self.granted and self.in_flight + offer.nbytes > self.window:
                break
            del self.waiting[offer.slot]
            self.granted[offer.slot] = (offer, now + self.grant_timeout)
            admitted.append(offer)
        self.peak_bytes = max(self.peak_bytes, self.in_flight)
        return admitted


@dataclass(frozen=True)
class Part:
    """What an engine is told of a part it is given: which of how many, the
    segments it holds, and the bytes of the parts before it."""

    index: int
    count: int
    segments: list[Segment]
    before: int

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


@dataclass
class UploadStream:
    """An update coming in parts (``elastic.wire.parts``), the one record of it: each
    part is offered to the gate in turn, so parts of many workers share the window;
    the engine is given each part as a ``Part``."""

    job: str
    key: str
    parts: list[list[Segment]]
    itemsizes: dict[str, int]
    index: int = 0  # the part expected next
    received: int = 0  # the bytes of the parts before it

    def bytes(self, index: int) -> int | None:
        """Part ``index``'s bytes; None past the last part."""
        return nbytes(self.parts[index], self.itemsizes) if index < len(self.parts) else None

    def expects(self, key: str, part: object) -> bool:
        """Whether ``part`` (a message's ``[index, count]``) of ``key`` is the one due."""
        return key == self.key and part == [self.index, len(self.parts)]

    def current(self) -> Part:
        return Part(self.index, len(self.parts), self.parts[self.index], self.received)

    def advance(self, received: int) -> int | None:
        """The part due came (``received`` bytes): the bytes of the next, None if none."""
        self.received += received
        self.index += 1
        return self.bytes(self.index)
