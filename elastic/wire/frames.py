"""Socket-free ``encode(msg) -> frames`` and ``decode(frames) -> msg``.

A message is ``[header] [buf0] [buf1] …``: a msgpack header, then each tensor's bytes
cut into frames of about ``CHUNK_BYTES``. Frames are memoryviews over the tensors'
own memory (send them with ``copy=False``); on the way in each frame becomes a
``torch.frombuffer`` view. Nothing is pickled.

``decode`` trusts nothing: every header field is checked before it is used, and the
only exception it lets out is ``ProtocolError``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from elastic.errors import ProtocolError
from elastic.wire.header import (
    CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_HEADER_BYTES,
    Message,
    MsgType,
    as_buffer,
    pack,
    parse_placed,
)
from elastic.wire.shm import SegmentReader
from elastic.wire.tensors import DTYPE_NAMES, DTYPES, WireTensor

__all__ = [
    "encode",
    "encode_parts",
    "decode",
    "CHUNK_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_HEADER_BYTES",
]


def encode(msg: Message, chunk_bytes: int = CHUNK_BYTES) -> list[bytes | memoryview]:
    """Turn a message into frames. Tensor frames alias the tensors' memory."""
    specs, buffers = encode_parts(msg, chunk_bytes)
    return [pack(msg, specs), *buffers]


def encode_parts(
    msg: Message, chunk_bytes: int = CHUNK_BYTES
) -> tuple[list[dict[str, Any]], list[memoryview]]:
    """The tensor specs for the header, and the data frames (views of the tensors)."""
    if chunk_bytes <= 0 or chunk_bytes % 8:
        raise ValueError(f"chunk_bytes must be a positive multiple of 8, got {chunk_bytes}")
    specs: list[dict[str, Any]] = []
    buffers: list[memoryview] = []
    for name, wt in msg.tensors.items():
        if wt.dtype not in DTYPE_NAMES:
            raise ProtocolError("bad_dtype", f"tensor {name!r} has unsupported dtype {wt.dtype}")
        nframes = 0
        for chunk in wt.chunks:
            if chunk.dtype != wt.dtype:  # received narrower (a cast codec's part): sent as declared
                chunk = chunk.to(wt.dtype)
            raw = chunk.reshape(-1).view(torch.uint8).numpy().data  # a memoryview of the tensor
            for start in range(0, len(raw), chunk_bytes):
                buffers.append(raw[start : start + chunk_bytes])
                nframes += 1
        specs.append(
            {
                "name": name,
                "dtype": DTYPE_NAMES[wt.dtype],
                "shape": list(wt.shape),
                "nbytes": wt.nbytes,
                "frames": nframes,
            }
        )
    return specs, buffers


def decode(
    frames: Sequence[Any],
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    check_finite: bool = True,
    shm: SegmentReader | None = None,
) -> Message:
    """Parse and validate frames (bytes, memoryviews or ``zmq.Frame``) into a message.

    Tensor chunks are zero-copy views over the frames. With ``check_finite`` an
    ``UPDATE`` carrying NaN or Inf is rejected. ``shm`` reads the frames of a message
    placed in the sender's shared-memory segment (None: this peer may not do that).
    """
    if not frames:
        raise ProtocolError("empty", "message has no frames")
    msg, specs, placement = parse_placed(frames[0])
    if placement is None:
        buffers = [as_buffer(f) for f in frames[1:]]
    elif shm is None:
        raise ProtocolError(
            "bad_shm",
            "frames in shared memory from a peer not known to share this host; send them on the "
            "socket",
        )
    elif len(frames) > 1:
        raise ProtocolError("bad_shm", "frames both in shared memory and on the socket")
    else:
        buffers = shm.frames(placement)
    declared_frames = 0
    total = 0
    for spec in specs:
        declared_frames += spec["frames"]
        total += spec["nbytes"]
    if declared_frames != len(buffers):
        raise ProtocolError(
            "frame_count", f"header declares {declared_frames} data frames, got {len(buffers)}"
        )
    if total > max_message_bytes:
        raise ProtocolError(
            "too_large", f"message carries {total} bytes, the limit is {max_message_bytes}"
        )
    pos = 0
    for spec in specs:
        name = spec["name"]
        if name in msg.tensors:
            raise ProtocolError("duplicate_tensor", f"tensor {name!r} appears twice")
        wt = WireTensor(
            dtype=DTYPES[spec["dtype"]], shape=tuple(spec["shape"]), shared=placement is not None
        )
        itemsize = wt.dtype.itemsize
        got = 0
        for buf in buffers[pos : pos + spec["frames"]]:
            if len(buf) == 0 or len(buf) % itemsize:
                raise ProtocolError(
                    "frame_length",
                    f"tensor {name!r}: frame of {len(buf)} bytes is not a whole number "
                    f"of {spec['dtype']} elements",
                )
            got += len(buf)
            wt.chunks.append(_view(buf, wt.dtype))
        pos += spec["frames"]
        if got != spec["nbytes"]:
            raise ProtocolError(
                "length_mismatch",
                f"tensor {name!r}: header says {spec['nbytes']} bytes, frames carry {got}",
            )
        if check_finite and msg.type is MsgType.UPDATE and not wt.is_finite():
            raise ProtocolError("non_finite", f"tensor {name!r} contains NaN or Inf")
        msg.tensors[name] = wt
    return msg


def _view(buf: memoryview, dtype: torch.dtype) -> torch.Tensor:
    if not buf.readonly:  # zmq frames: a plain zero-copy view
        return torch.frombuffer(buf, dtype=dtype)
    with warnings.catch_warnings():  # bytes input (tests, tools): torch warns it is read-only
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=dtype)
