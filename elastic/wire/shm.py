"""Same-host frames: tensor bytes through a shared-memory segment instead of the socket.

On one host, loopback TCP moves a 100 MB model at ~1.7-4.9 GB/s and costs the kernel
two copies; a copy into warm shared memory runs at the memory's speed. So when a
worker runs on its coordinator's host, each direction of their connection gets one
segment in ``/dev/shm``: the sender copies a message's frames into its segment, and
the socket carries only the header, which says where they lie (``placement``). The
receiver reads them in place.

One writer and one reader per segment; its first 64 bytes are the protocol:

* ``posted``: how many messages the writer has put in (it writes this);
* ``released``: the last message the reader is done with (it writes this).

The writer puts a message in only when ``released == posted``: the reader holds
nothing of the segment. Otherwise the frames go on the socket as usual. A slow reader
never sees bytes overwritten under it, and never blocks the writer. If the segment
stays held for ``REPLACE_AFTER_BUSY`` big messages in a row, the writer unlinks it
and starts a new one: the reader keeps its mapping of the old for as long as it
views it, so this too is safe, and a message lost on the way costs three messages
on the socket, not the rest of the session. The reader
releases a message when the last view of its frames is gone (a finalizer on the
array they all view), so a worker that keeps a model's tensors only delays the next
message onto the socket, it never corrupts it.

Whether the peer is on this host is tested, never assumed: a worker's HELLO names a
probe file in ``/dev/shm`` and the random token in it; the coordinator says yes in
WELCOME only if it reads that token there. A segment is unlinked as soon as its
reader has mapped it (or when its writer closes), so a crash leaks no file past the
sweep of dead writers' files at start.

Trust: the reader folds bytes the writer can still change. A process that can write
a segment runs as the same user on the same host, and could as well write the
reader's memory; a peer on another host can never use this path.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
import stat
import struct
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from elastic.errors import ProtocolError

if TYPE_CHECKING:
    import torch

__all__ = [
    "SHM_DIR",
    "SHM_MIN_BYTES",
    "Probe",
    "SegmentWriter",
    "SegmentReader",
    "Ticket",
    "is_local",
    "sweep",
]

log = logging.getLogger("elastic.wire")

SHM_DIR = "/dev/shm"
# Below this a message goes on the socket: the copy would save less than it costs.
SHM_MIN_BYTES = 1 << 20
MAGIC = b"ELSHM\x00\x01\x00"
HEADER_BYTES = 64  # magic, posted, released, then the probe's token
ALIGN = 64  # frames start on cache lines
POSTED, RELEASED, _TOKEN = 8, 16, 24
_NAME = re.compile(r"elastic-(\d+)-[0-9a-f]{16}")
_STALE_AFTER = 60.0  # a segment of a dead writer, unmapped this long, is garbage
# After this many big messages in a row found the segment still held, the writer
# starts a new one and leaves the old to its reader: a message the reader never got
# (a connection dropped under it) must not keep this peer on the socket for good.
REPLACE_AFTER_BUSY = 3


def _new_name() -> str:
    return f"elastic-{os.getpid()}-{secrets.token_hex(8)}"


def layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of frames of ``sizes`` in a segment, and the segment size they need."""
    offsets, at = [], HEADER_BYTES
    for size in sizes:
        offsets.append(at)
        at += -(-size // ALIGN) * ALIGN
    return offsets, at


def create_segment(size: int) -> tuple[str, mmap.mmap]:
    """A new segment of ``size`` bytes, its memory reserved now (ENOSPC here, not SIGBUS later)."""
    name = _new_name()
    fd = os.open(
        os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
    )
    try:
        try:
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(os.path.join(SHM_DIR, name))
            raise
    finally:
        os.close(fd)
    mm[: len(MAGIC)] = MAGIC
    return name, mm


def open_segment(name: str, private: bool = False) -> mmap.mmap:
    """Map an existing segment another process of ours made; ProtocolError if it is not
    one. ``private``: copy-on-write (it still reads what the writer writes, while this
    process's own writes stay here)."""
    if not _NAME.fullmatch(name):
        raise ProtocolError(
            "bad_shm", f"shared-memory segment name {name[:80]!r} is not one of ours"
        )
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:
        raise ProtocolError(
            "bad_shm", f"cannot open shared-memory segment {name}: {exc.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size < HEADER_BYTES:
            raise ProtocolError(
                "bad_shm", f"shared-memory segment {name} is not a segment of this user"
            )
        mm = (
            mmap.mmap(fd, st.st_size, flags=mmap.MAP_PRIVATE)
            if private
            else mmap.mmap(fd, st.st_size)
        )
    finally:
        os.close(fd)
    if mm[: len(MAGIC)] != MAGIC:
        raise ProtocolError("bad_shm", f"shared-memory segment {name} has no segment header")
    return mm


def unlink_segment(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))


def read_word(mm: mmap.mmap, at: int) -> int:
    value: int = struct.unpack_from("<Q", mm, at)[0]
    return value


def _release(mm: mmap.mmap, seq: int) -> None:
    if not mm.closed and read_word(mm, RELEASED) < seq:
        struct.pack_into("<Q", mm, RELEASED, seq)


def shm_available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def sweep() -> int:
    """Unlink segments whose writer is dead and that nobody mapped for a minute; how many."""
    if not shm_available():
        return 0
    removed = 0
    now = time.time()
    for name in os.listdir(SHM_DIR):
        match = _NAME.fullmatch(name)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
            continue  # alive (or not ours to signal): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(OSError):
            if now - os.stat(os.path.join(SHM_DIR, name)).st_mtime > _STALE_AFTER:
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
    return removed


class Probe:
    """A token in a file of ``/dev/shm``: whoever reads it there shares this host's memory."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self.name, mm = create_segment(HEADER_BYTES)
        mm[_TOKEN : _TOKEN + 16] = bytes.fromhex(self.token)
        mm.close()

    def describe(self) -> dict[str, str]:
        """What HELLO carries as ``meta["shm"]``."""
        return {"probe": self.name, "token": self.token}

    def close(self) -> None:
        unlink_segment(self.name)


def is_local(described: Any) -> bool:
    """True when the probe a HELLO describes is readable here and holds its token."""
    if (
        not isinstance(described, dict)
        or not isinstance(described.get("probe"), str)
        or not isinstance(described.get("token"), str)
    ):
        return False
    try:
        token = bytes.fromhex(described["token"])
        mm = open_segment(described["probe"])
    except (ProtocolError, ValueError):
        return False
    try:
        # (a data segment holds zeros there: a zero token proves nothing)
        return len(token) == 16 and token != bytes(16) and mm[_TOKEN : _TOKEN + 16] == token
    finally:
        mm.close()


class Ticket:
    """Says when the reader is done with a message sent from memory in the segment
    (``done``, like ZeroMQ's ``MessageTracker``): until then that memory must not change."""

    def __init__(self, mm: mmap.mmap, seq: int) -> None:
        self._mm, self._seq = mm, seq

    @property
    def done(self) -> bool:
        return self._mm.closed or read_word(self._mm, RELEASED) >= self._seq


def _address(buf: Any) -> int:
    address: int = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    return address


class SegmentWriter:
    """The sending end of one direction of one connection. Thread-safe: a worker's
    trainer places tensors (``place``) while its main thread sends (``put``)."""

    def __init__(self, min_bytes: int = SHM_MIN_BYTES) -> None:
        self.min_bytes = min_bytes
        self.name = ""
        self._mm: mmap.mmap | None = None
        self._base = 0  # the mapping's address
        self._posted = 0
        self._unlinked = True
        self._held_run = 0  # big messages in a row that found the segment held
        self._lock = threading.RLock()
        self.sent = 0  # messages that went through the segment
        self.in_place = 0  # of those, sent from memory already in it (no copy)
        self.busy = 0  # big messages that went on the socket: the reader still held the last
        self.disabled = ""  # why this writer gave up (no room in /dev/shm), or ""
        self.ticket: Ticket | None = None  # of the last message sent in place
        self._owner = ""  # whose tensors live in the segment (``place``), or ""

    def place(self, like: Mapping[str, torch.Tensor], owner: str) -> dict[str, torch.Tensor] | None:
        """Tensors shaped like ``like`` (contiguous, on the CPU), in the segment where
        ``put`` would copy them: a message of exactly these tensors, in this order, is
        then sent with no copy. None when the segment is held or cannot be made.
        Once sent, the tensors must not change until ``ticket`` is done.

        The segment then belongs to ``owner``'s tensors: another owner, or a message
        that must be copied in, gets a new segment, and the old mapping stays with
        the tensors that live in it."""
        import torch  # noqa: PLC0415 - only a worker placing its parameters needs it

        sizes = [t.numel() * t.element_size() for t in like.values()]
        offsets, size = layout(sizes)
        with self._lock:
            if self.disabled or sum(sizes) < self.min_bytes:
                return None
            if self._mm is not None and read_word(self._mm, RELEASED) != self._posted:
                return None
            if self._owner and self._owner != owner:
                self.close()
            if (self._mm is None or len(self._mm) < size) and not self._replace(size):
                return None
            assert self._mm is not None
            self._owner = owner
            return {
                name: torch.frombuffer(self._mm, dtype=t.dtype, count=t.numel(), offset=at).view(
                    t.shape
                )
                for (name, t), at in zip(like.items(), offsets, strict=True)
            }

    def put(self, frames: Sequence[memoryview]) -> dict[str, Any] | None:
        """Copy ``frames`` into the segment (unless they already lie where they go)
        and return their placement for the header; None when they should go on the
        socket (small, or the reader is not done)."""
        with self._lock:
            return self._put(frames)

    def _put(self, frames: Sequence[memoryview]) -> dict[str, Any] | None:
        sizes = [len(f) for f in frames]
        if self.disabled or sum(sizes) < self.min_bytes:
            return None
        offsets, size = layout(sizes)
        released = read_word(self._mm, RELEASED) if self._mm is not None else 0
        held = self._mm is not None and released != self._posted
        if held:
            self.busy += 1
            self._held_run += 1
            if self._held_run < REPLACE_AFTER_BUSY:
                return None
            log.info(
                "shared-memory segment still held after %d messages; starting a new one",
                self._held_run,
            )
        in_place = (
            not held
            and self._mm is not None
            and all(_address(f) == self._base + at for at, f in zip(offsets, frames, strict=True))
        )
        if self._mm is not None and (held or (self._owner and not in_place)):
            # Held too long, or placed tensors live here and must never be copied
            # over: a new segment; the old mapping stays with whoever views it.
            size = max(size, len(self._mm))
            self.close()
        elif released and not self._unlinked:  # the reader has it mapped: the name can go
            unlink_segment(self.name)
            self._unlinked = True
        if self._mm is None or len(self._mm) < size:
            if not self._replace(size):
                return None
        self._held_run = 0
        assert self._mm is not None
        if not in_place:
            for at, frame in zip(offsets, frames, strict=True):
                np.frombuffer(self._mm, dtype=np.uint8, count=len(frame), offset=at)[:] = (
                    np.frombuffer(frame, dtype=np.uint8)
                )
        self._posted += 1
        struct.pack_into("<Q", self._mm, POSTED, self._posted)
        self.sent += 1
        self.in_place += in_place
        self.ticket = Ticket(self._mm, self._posted) if in_place else None
        return {"seg": self.name, "seq": self._posted, "sizes": sizes}

    def _replace(self, size: int) -> bool:
        self.close()
        size = -(-size // (1 << 20)) * (1 << 20)  # whole MiB: a model that grows a little reuses it
        try:
            self.name, self._mm = create_segment(size)
        except OSError as exc:
            self.disabled = f"cannot reserve {size} bytes in {SHM_DIR}: {exc.strerror}"
            log.warning(
                "shared-memory path off for this peer, frames go on the socket: %s", self.disabled
            )
            return False
        self._base = _address(self._mm)
        self._posted = 0
        self._unlinked = False
        return True

    def close(self) -> None:
        with self._lock:
            if self._mm is not None and not self._unlinked:
                unlink_segment(self.name)
            self._unlinked = True
            self._mm = None  # closed when the last view (or placed tensor) of it goes
            self._owner = ""


class SegmentReader:
    """The receiving end: maps the peer's current segment and views frames in it."""

    def __init__(self) -> None:
        self.name = ""
        self._mm: mmap.mmap | None = None

    def frames(self, placement: Any) -> list[memoryview]:
        """Views of the frames a header's ``shm`` placement names; every field checked.

        The message is released to the writer when the last of these views is gone.
        """
        if not isinstance(placement, dict):
            raise ProtocolError("bad_shm", "shm placement is not a map")
        name, seq, sizes = placement.get("seg"), placement.get("seq"), placement.get("sizes")
        if (
            not isinstance(name, str)
            or not isinstance(seq, int)
            or isinstance(seq, bool)
            or not isinstance(sizes, list)
        ):
            raise ProtocolError(
                "bad_shm", "shm placement needs seg (str), seq (int) and sizes (list)"
            )
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes):
            raise ProtocolError("bad_shm", "shm frame sizes must be integers >= 0")
        if name != self.name or self._mm is None:
            self._mm = open_segment(name)  # the old mapping closes when its last view goes
            self.name = name
        mm = self._mm
        offsets, end = layout(sizes)
        if end > len(mm):
            raise ProtocolError(
                "bad_shm", f"shm frames end at byte {end}, the segment has {len(mm)}"
            )
        if read_word(mm, POSTED) != seq:
            raise ProtocolError(
                "bad_shm", f"shm message {seq} is not the one posted ({read_word(mm, POSTED)})"
            )
        region = np.frombuffer(mm, dtype=np.uint8, count=end - HEADER_BYTES, offset=HEADER_BYTES)
        weakref.finalize(region, _release, mm, seq)
        return [
            region[at - HEADER_BYTES : at - HEADER_BYTES + size].data
            for at, size in zip(offsets, sizes, strict=True)
        ]

    def forget(self) -> None:
        """Drop the mapping (the peer left); it closes when its last view goes."""
        self._mm = None
        self.name = ""


class LocalPeers:
    """The coordinator's shared-memory ends, for each worker found on this host."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and shm_available()
        self._writers: dict[str, SegmentWriter] = {}
        self._readers: dict[str, SegmentReader] = {}
        self._gone = (0, 0)  # the counts of writers dropped
        if self.enabled:
            sweep()

    def hello(self, peer: str, described: Any) -> bool:
        """A (re)joining worker: True when it shares this host and the path is on."""
        self.drop(peer)
        if not self.enabled or not is_local(described):
            return False
        self._writers[peer] = SegmentWriter()
        self._readers[peer] = SegmentReader()
        return True

    def writer(self, peer: str) -> SegmentWriter | None:
        return self._writers.get(peer)

    def is_local(self, peer: str) -> bool:
        """Whether ``peer`` shares this host (tensors to it go through memory)."""
        return peer in self._writers

    def reader(self, peer: str) -> SegmentReader | None:
        return self._readers.get(peer)

    def drop(self, peer: str) -> None:
        writer = self._writers.pop(peer, None)
        if writer is not None:
            writer.close()
            self._gone = (self._gone[0] + writer.sent, self._gone[1] + writer.busy)
        reader = self._readers.pop(peer, None)
        if reader is not None:
            reader.forget()

    def close(self) -> None:
        for peer in list(self._writers):
            self.drop(peer)

    def counts(self) -> tuple[int, int]:
        """(messages sent through shared memory, big ones that went on the socket
        because the reader still held the last), since start."""
        live = self._writers.values()
        return self._gone[0] + sum(w.sent for w in live), self._gone[1] + sum(w.busy for w in live)
