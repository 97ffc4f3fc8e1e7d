"""ZeroMQ sockets for the protocol, and sending/receiving messages on them.

The coordinator binds a ROUTER; each worker connects a DEALER whose routing id is
its worker id. Frames go out with ``copy=False`` (libzmq reads the tensors' memory)
and come in with ``copy=False`` (``decode`` views them with ``torch.frombuffer``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq

from elastic.wire.header import CHUNK_BYTES, MAX_HEADER_BYTES, Message, pack, parse
from elastic.wire.shm import SegmentWriter, Ticket

__all__ = [
    "router_socket",
    "dealer_socket",
    "send_message",
    "recv_frames",
    "decode_plain",
    "MAX_FRAME_BYTES",
]

# A frame is a header or a chunk; anything much larger is not ours. libzmq drops
# the connection of a peer that sends one, before it costs us memory.
MAX_FRAME_BYTES = max(MAX_HEADER_BYTES, CHUNK_BYTES) * 4
# Through shared memory a tensor is one frame: one copy, and one view to fold.
SHM_CHUNK_BYTES = 1 << 62


def _common(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    # Unlimited queues: a message is ~100s of frames, and frames are views of
    # immutable snapshots, so queued sends cost no copies. Never drop silently.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)


Secure = Callable[[zmq.Socket], None]  # sets CURVE options before bind/connect


def router_socket(
    ctx: zmq.Context, bind: str, secure: Secure | None = None
) -> tuple[zmq.Socket, str]:
    """A bound ROUTER; returns it and the endpoint actually bound (port ``0``/``*`` resolved)."""
    sock = ctx.socket(zmq.ROUTER)
    _common(sock)
    if secure is not None:
        secure(sock)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown peer -> error, not a silent drop
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker takes its id back
    if bind.startswith("tcp://") and bind.endswith(":0"):
        bind = bind[:-2] + ":*"
    sock.bind(bind)
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return sock, endpoint


def dealer_socket(
    ctx: zmq.Context, identity: str, connect: str, secure: Secure | None = None
) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    _common(sock)
    if secure is not None:
        secure(sock)
    sock.setsockopt(zmq.ROUTING_ID, identity.encode())
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.connect(connect)
    return sock


def send_message(
    sock: zmq.Socket,
    msg: Message,
    routing: bytes | None = None,
    track: bool = False,
    lane: SegmentWriter | None = None,
) -> zmq.MessageTracker | Ticket | None:
    """Send without blocking the caller's loop.

    With ``track`` the returned tracker says when libzmq (or, for tensors sent from
    their place in the shared-memory segment, the reader) is done with the tensor
    memory the frames alias; None means no frame aliases it. With ``lane`` (a peer on
    this host) big frames are copied into its shared-memory segment and only the
    header goes on the socket. Raises ``zmq.ZMQError`` (e.g. ``EHOSTUNREACH`` for a
    ROUTER peer that is gone).
    """
    if msg.tensors:
        from elastic.wire.frames import encode_parts  # noqa: PLC0415 - tensors need torch; requests do not

        specs, buffers = encode_parts(msg, SHM_CHUNK_BYTES if lane is not None else CHUNK_BYTES)
        placement = lane.put(buffers) if lane is not None else None
        if placement is not None:  # only the header goes on the socket
            assert lane is not None
            sock.send_multipart(
                [*([routing] if routing is not None else []), pack(msg, specs, placement)],
                flags=zmq.NOBLOCK,
            )
            # Sent from memory in the segment (placed there): free once the reader is done.
            return lane.ticket if track else None
        if lane is not None:  # on the socket after all: frames libzmq moves fastest
            specs, buffers = encode_parts(msg)
        frames: list[Any] = [pack(msg, specs), *buffers]
    else:
        frames = [pack(msg, [])]
    if routing is not None:
        frames.insert(0, routing)
    if not track:
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        return None
    # pyzmq copies a frame under its copy threshold, and that frame's tracker is done
    # at once; so track the last frame sent zero-copy. libzmq releases the frames of
    # one connection in order, so when it is done, every earlier one is too.
    tracked = max((i for i, f in enumerate(frames) if len(f) >= sock.copy_threshold), default=-1)
    tracker = None
    for i, frame in enumerate(frames):
        more = zmq.SNDMORE if i < len(frames) - 1 else 0
        sent = sock.send(frame, flags=zmq.NOBLOCK | more, copy=False, track=i == tracked)
        if i == tracked:
            tracker = sent
    return tracker


def recv_frames(sock: zmq.Socket, routed: bool) -> tuple[bytes | None, list[zmq.Frame]]:
    """Receive one multipart message without blocking; ``zmq.Again`` when none waits."""
    frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
    if routed:
        return frames[0].bytes, frames[1:]
    return None, frames


def decode_plain(frames: list[Any]) -> Message:
    """Decode a message, without importing torch when it carries no tensors (the
    control client: ``elastic job ...`` starts in a tenth of a second)."""
    if len(frames) == 1:
        msg, specs = parse(frames[0])
        if not specs:
            return msg
    from elastic.wire.frames import decode  # noqa: PLC0415 - tensors need torch

    return decode(frames, check_finite=False)
