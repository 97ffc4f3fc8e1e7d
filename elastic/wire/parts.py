"""Updates sent in parts: the coordinator never holds a whole update.

A big update arrives whole in one ZeroMQ multipart message (libzmq hands a message
over only once every frame is in), so folding it costs the coordinator the model,
the running sum and the whole update at once. Sent in parts, it costs a part.

The coordinator cuts the model's flat elements, tensor after tensor in the model's
order, into parts of about ``part_bytes`` (``grid``); a part is a list of segments
``(name, start, stop)``: elements ``start:stop`` of the flattened tensor ``name``.
Each GRANT names one part (``meta.part = [index, count]``, ``meta.segments``); the
worker answers with an UPDATE that carries those segments as flat tensors, under
the same names, and the same ``part`` (``part_message``). The next part is granted
once this one is folded, so what is in flight stays within the upload window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from elastic.errors import ProtocolError
from elastic.wire.header import Message, MsgType
from elastic.wire.tensors import WireTensor

__all__ = ["Segment", "grid", "nbytes", "part_message", "check_grant"]

Segment = tuple[str, int, int]  # tensor name, first element, element after the last


def grid(tensors: Iterable[tuple[str, int, int]], part_bytes: int) -> list[list[Segment]]:
    """Parts of about ``part_bytes`` over ``(name, numel, itemsize)`` in order; a
    tensor bigger than a part is cut at element boundaries, small ones share one."""
    if part_bytes < 8:  # the widest item must fit in a part
        raise ValueError(f"part_bytes must be >= 8, got {part_bytes}")
    parts: list[list[Segment]] = [[]]
    room = part_bytes
    for name, numel, itemsize in tensors:
        start = 0
        while start < numel:
            if room < itemsize:
                parts.append([])
                room = part_bytes
            stop = min(numel, start + room // itemsize)
            parts[-1].append((name, start, stop))
            room -= (stop - start) * itemsize
            start = stop
    return [p for p in parts if p]


def nbytes(segments: Iterable[Segment], itemsizes: Mapping[str, int]) -> int:
    """The bytes a part holds."""
    return sum((stop - start) * itemsizes[name] for name, start, stop in segments)


def check_grant(meta: Mapping[str, Any]) -> tuple[int, int, list[Segment]] | None:
    """A GRANT's part (index, count, segments), None for a whole update; raises
    ``ProtocolError`` for a malformed one."""
    if "part" not in meta:
        return None
    part, segments = meta.get("part"), meta.get("segments")
    if not (
        isinstance(part, list)
        and len(part) == 2
        and all(type(v) is int for v in part)
        and 0 <= part[0] < part[1]
    ):
        raise ProtocolError(
            "bad_part", f"GRANT part must be [index, count] with 0 <= index < count, got {part!r}"
        )
    if not isinstance(segments, list) or not segments:
        raise ProtocolError("bad_part", "GRANT of a part names no segments")
    out = []
    for seg in segments:
        if not (
            isinstance(seg, list)
            and len(seg) == 3
            and isinstance(seg[0], str)
            and type(seg[1]) is int
            and type(seg[2]) is int
            and 0 <= seg[1] < seg[2]
        ):
            raise ProtocolError(
                "bad_part",
                f"a segment must be [name, start, stop] with 0 <= start < stop, got {seg!r}",
            )
        out.append((seg[0], seg[1], seg[2]))
    return part[0], part[1], out


def part_message(update: Message, index: int, count: int, segments: list[Segment]) -> Message:
    """The UPDATE that carries ``segments`` of ``update`` (views, no copy)."""
    if update.encodings:
        raise ProtocolError("bad_part", "a compressed update is sent whole")
    tensors: dict[str, WireTensor] = {}
    for name, start, stop in segments:
        whole = update.tensors.get(name)
        if whole is None or stop > whole.numel or name in tensors:
            raise ProtocolError(
                "bad_part", f"segment {name!r} [{start}:{stop}] is not in this update"
            )
        chunks = [c for _, c in whole.iter_chunks(start, stop)]
        tensors[name] = WireTensor(
            dtype=whole.dtype, shape=(stop - start,), chunks=chunks, shared=whole.shared
        )
    meta = {**update.meta, "part": [index, count]}
    return Message(
        MsgType.UPDATE,
        job=update.job,
        round=update.round,
        version=update.version,
        sender=update.sender,
        key=update.key,
        meta=meta,
        tensors=tensors,
    )
