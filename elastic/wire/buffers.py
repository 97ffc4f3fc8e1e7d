"""Reusable tensor buffers that outgoing frames alias.

Frames go out with ``copy=False``: libzmq reads the tensors' memory after
``send`` returns. A buffer set is reused only once every message that referenced it
is done (ZeroMQ's ``MessageTracker``), so a slow receiver can never see memory
overwritten under it, and the common case costs no allocation: a fresh 400 MB
buffer costs ~100 ms of page faults, a copy into a warm one ~20 ms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

__all__ = ["BufferSet", "BufferPool", "Tracker", "reusable"]


class Tracker(Protocol):
    """What says when a sent message's memory may change: ZeroMQ's ``MessageTracker``,
    or a shared-memory ``Ticket`` (``elastic.wire.shm``)."""

    @property
    def done(self) -> bool: ...


def reusable(
    cache: dict[str, torch.Tensor],
    name: str,
    like: torch.Tensor,
    device: torch.device | None = None,
    pin: bool = False,
) -> torch.Tensor:
    """``cache[name]``: shaped like ``like``, on ``device`` (default: like's; pinned host
    memory with ``pin``), reallocated only when the shape or dtype changed.

    For private scratch memory that no frame aliases; memory that frames alias goes
    through a ``BufferPool``.
    """
    where = torch.device("cpu") if pin else (device or like.device)
    buf = cache.get(name)
    if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != where:
        buf = cache[name] = torch.empty(like.shape, dtype=like.dtype, device=where, pin_memory=pin)
    return buf


@dataclass
class BufferSet:
    """Named tensors plus the trackers of the messages that alias them."""

    tensors: dict[str, torch.Tensor]
    trackers: list[Tracker] = field(default_factory=list)
    busy: bool = True  # acquired and not yet released by its user

    def attach(self, tracker: Tracker | None) -> None:
        if tracker is not None:
            self.trackers.append(tracker)

    def release(self) -> None:
        """The user is done; the set is free once its messages are sent."""
        self.busy = False

    def release_after(self, tracker: Tracker | None) -> None:
        """Sent as one message with this tracker (None: not sent): free once it is out."""
        self.attach(tracker)
        self.release()

    @property
    def free(self) -> bool:
        if self.busy:
            return False
        self.trackers = [t for t in self.trackers if not t.done]
        return not self.trackers

    def fits(self, like: Mapping[str, torch.Tensor]) -> bool:
        return self.tensors.keys() == like.keys() and all(
            b.shape == t.shape and b.dtype == t.dtype
            for b, t in zip(self.tensors.values(), like.values(), strict=True)
        )


class BufferPool:
    """Buffer sets shaped like a model, in host memory (pinned when ``pin``)."""

    def __init__(self, pin: bool = False, keep: int = 4) -> None:
        self.pin = pin
        self.keep = keep
        self._sets: list[BufferSet] = []

    def acquire(self, like: Mapping[str, torch.Tensor]) -> BufferSet:
        """A free set shaped like ``like`` (contents undefined); allocated if none is free."""
        self._sets = [s for s in self._sets if s.fits(like) or not s.free]  # shapes changed: drop
        for s in self._sets:
            if s.free and s.fits(like):  # re-check fits: trackers finish concurrently
                s.busy = True
                return s
        new = BufferSet(
            {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin) for k, t in like.items()}
        )
        self._sets.append(new)
        if len(self._sets) > self.keep:  # many messages in flight: forget free surplus sets
            surplus = [s for s in self._sets if s.free][: len(self._sets) - self.keep]
            self._sets = [s for s in self._sets if s not in surplus]
        return new

    def copy_of(self, tensors: Mapping[str, torch.Tensor]) -> BufferSet:
        """A set holding a copy of ``tensors`` (from any device)."""
        s = self.acquire(tensors)
        for name, t in tensors.items():
            s.tensors[name].copy_(t.detach(), non_blocking=self.pin)
        if self.pin and any(t.is_cuda for t in tensors.values()):
            torch.cuda.synchronize()
        return s
