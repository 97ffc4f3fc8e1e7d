"""The model reference in shared memory: one writer (the coordinator's downlink), any
number of readers (the workers on its host), guarded by a seqlock, so nothing is
copied or sent per worker. The segments themselves are ``elastic.wire.shm``'s."""

from __future__ import annotations

import contextlib
import mmap
import struct
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from elastic.errors import ProtocolError
from elastic.wire.shm import (
    HEADER_BYTES,
    POSTED,
    RELEASED,
    create_segment,
    layout,
    open_segment,
    read_word,
    unlink_segment,
)

if TYPE_CHECKING:
    import torch

__all__ = ["SharedTensors", "SharedReader"]


class SharedTensors:
    """Named tensors that every worker on this host reads where they lie (the
    compressed downlink's reference): one writer, any number of readers, and no
    message or release per reader, so nothing is copied per worker.

    A seqlock guards them. The writer makes ``seq`` odd while it changes them
    (``changing``), stamps the version they now stand for, and makes ``seq`` even
    again. A reader copies them out and keeps the copy only if ``seq`` was even and
    unchanged across the copy, and the version is the one its WORK names. The
    coordinator changes them only between rounds, so a reader that finds them
    changing was too late for its round anyway. (x86-64 and ARMv8 order plain
    stores to one mapping as the seqlock needs from Python's side: each step is a
    separate call that the interpreter finishes before the next.)

    The file stays in ``/dev/shm`` while the writer lives (workers may join at any
    time); ``close`` unlinks it, and ``sweep`` takes it after a crash.
    """

    def __init__(self, like: Mapping[str, torch.Tensor]) -> None:
        """Room for tensors shaped like ``like`` (CPU); ``OSError`` when none."""
        import torch  # noqa: PLC0415 - only the coordinator's downlink makes these

        sizes = [t.numel() * t.element_size() for t in like.values()]
        offsets, size = layout(sizes)
        self.name, self._mm = create_segment(size)
        self.tensors = {
            name: torch.frombuffer(self._mm, dtype=t.dtype, count=t.numel(), offset=at).view(
                t.shape
            )
            for (name, t), at in zip(like.items(), offsets, strict=True)
        }
        self._offsets = dict(zip(like, offsets, strict=True))

    def describe(self) -> dict[str, Any]:
        """What a WORK carries for a reader (``SharedReader.copy_into``)."""
        return {"seg": self.name, "at": self._offsets}

    @contextlib.contextmanager
    def changing(self, version: int) -> Iterator[None]:
        """Around every change of the tensors; they then stand for ``version``."""
        seq = read_word(self._mm, POSTED)
        struct.pack_into("<Q", self._mm, POSTED, seq + 1)
        try:
            yield
        finally:
            struct.pack_into("<Q", self._mm, RELEASED, version)
            struct.pack_into("<Q", self._mm, POSTED, seq + 2)

    def close(self) -> None:
        """Unlink the file; the mapping lives while the tensors are viewed."""
        unlink_segment(self.name)


class SharedReader:
    """A worker's end of ``SharedTensors``. It maps the segment once, copy-on-write:
    it reads what the coordinator writes, and nothing it might write reaches the
    coordinator's reference. Tensors are copied out (``copy_into``), or viewed where
    they lie (``view``, for parameters that are only read: taking a gradient)."""

    def __init__(self) -> None:
        self.name = ""
        self._mm: mmap.mmap | None = None
        self._seq = 0  # the seqlock's count when ``stable`` last found it still

    def _where(
        self, described: Any, like: Mapping[str, torch.Tensor]
    ) -> tuple[mmap.mmap, dict[str, int]]:
        """The mapping and each tensor's offset; ProtocolError when not readable."""
        if (
            not isinstance(described, dict)
            or not isinstance(described.get("seg"), str)
            or not isinstance(described.get("at"), dict)
        ):
            raise ProtocolError(
                "bad_shm", "the shared reference's description needs seg (str) and at (map)"
            )
        at = described["at"]
        if set(at) != set(like) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= HEADER_BYTES
            for v in at.values()
        ):
            raise ProtocolError(
                "bad_shm", "the shared reference holds other tensors than this model's"
            )
        if described["seg"] != self.name or self._mm is None:
            self._mm = open_segment(
                described["seg"], private=True
            )  # the old mapping goes with its last view
            self.name = described["seg"]
        if any(at[name] + t.numel() * t.element_size() > len(self._mm) for name, t in like.items()):
            raise ProtocolError(
                "bad_shm", "the shared reference's tensors lie past its segment's end"
            )
        return self._mm, at

    def stable(self, version: int) -> str | None:
        """None when the tensors stand still at ``version`` (remembered for
        ``unchanged``); else why not."""
        assert self._mm is not None
        seq, stamped = read_word(self._mm, POSTED), read_word(self._mm, RELEASED)
        if seq % 2 or stamped != version:
            return (
                f"the shared reference is being changed or stands for version {stamped}, not "
                f"{version}"
            )
        self._seq = seq
        return None

    def unchanged(self) -> bool:
        """True when no change began since ``stable`` said yes."""
        return self._mm is not None and read_word(self._mm, POSTED) == self._seq

    def copy_into(
        self, described: Any, targets: Mapping[str, torch.Tensor], version: int
    ) -> str | None:
        """Copy the described tensors into ``targets`` (same names, dtypes and
        shapes): None when done; why not when they were changing or stand for
        another version (the targets then hold nothing usable). ``ProtocolError``
        when the description or the segment is not one to read at all."""
        import torch  # noqa: PLC0415

        mm, at = self._where(described, targets)
        why = self.stable(version)
        if why is not None:
            return why
        for name, target in targets.items():
            source = torch.frombuffer(mm, dtype=target.dtype, count=target.numel(), offset=at[name])
            target.copy_(source.view(target.shape))
        if not self.unchanged():
            return "the shared reference changed while it was read (its round was over)"
        return None

    def view(self, described: Any, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors shaped like ``like`` where the described ones lie (no copy). They
        change when the coordinator changes its reference: check ``stable`` before
        use and ``unchanged`` after. A write to them stays in this process, and
        from then on that page no longer follows the coordinator's (a new reader
        maps afresh). ``ProtocolError`` as ``copy_into``."""
        import torch  # noqa: PLC0415

        mm, at = self._where(described, like)
        return {
            name: torch.frombuffer(mm, dtype=t.dtype, count=t.numel(), offset=at[name]).view(
                t.shape
            )
            for name, t in like.items()
        }
