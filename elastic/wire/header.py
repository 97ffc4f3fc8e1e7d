"""The message header: what every message is, checked before anything uses it.

Free of torch, so a client that only sends requests and reads replies (``elastic
job ...``) starts in a tenth of a second. ``frames`` adds the tensor frames on top.
A header is a msgpack map: protocol version, type, job, round, version, sender,
key, ``meta`` (its required fields per type in ``META_SCHEMA``), the tensor specs
(name, dtype, shape, byte count, frame count) and, for compressed tensors, their
codec records (``enc``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import msgpack

from elastic.errors import ProtocolError
from elastic.typecheck import Expected, coerce, type_names

if TYPE_CHECKING:
    from elastic.wire.tensors import WireTensor

__all__ = [
    "PROTOCOL_VERSION",
    "MsgType",
    "Message",
    "META_REQUIRED",
    "META_OPTIONAL",
    "META_SCHEMA",
    "DTYPE_SIZES",
    "CHUNK_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_HEADER_BYTES",
    "pack",
    "parse",
    "parse_placed",
    "as_buffer",
]

PROTOCOL_VERSION = 1


class MsgType(StrEnum):
    """Every message type on the wire. Anything else is rejected as ``unknown_type``."""

    HELLO = "HELLO"  # worker -> coordinator: join (or re-join) with a description of itself
    WELCOME = "WELCOME"  # coordinator -> worker: accepted; heartbeat settings
    HEARTBEAT = "HEARTBEAT"  # worker -> coordinator: still alive
    HEARTBEAT_ACK = "HEARTBEAT_ACK"  # coordinator -> worker: coordinator still alive
    BYE = "BYE"  # worker -> coordinator: graceful leave
    WORK = "WORK"  # coordinator -> worker: the model at `version` and what to do with it
    UPDATE = "UPDATE"  # worker -> coordinator: the result, computed against `version`
    # worker -> coordinator: a big UPDATE (`key`, meta.bytes; meta.parts: can send it in parts) is
    # ready
    OFFER = "OFFER"
    # coordinator -> worker: send the offered UPDATE `key` now (with meta.part: that part of it)
    GRANT = "GRANT"
    ACK = "ACK"  # coordinator -> worker: update folded in
    NACK = "NACK"  # either way: rejected, with a reason
    REQUEST = "REQUEST"  # operator -> coordinator's control socket: op and args
    REPLY = "REPLY"  # coordinator -> operator: ok, data (tensors for an export), or the error
    # either way, within a round: a step of a conversation between the job's rule and a
    # participant besides its update (meta.stage, meta.data: a secure aggregation's keys)
    EXCHANGE = "EXCHANGE"


# An UPDATE of at least this many payload bytes is OFFERed first and sent once
# GRANTed (the coordinator bounds how many it receives at once); a smaller one is
# sent at once, since the round trip would cost more than the memory it saves.
OFFER_MIN_BYTES = 1 << 20

# The dtypes allowed on the wire, by wire name, with their item sizes.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float64": 8,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}

# Every `meta` field of every type, with the Python types its value must have:
# REQUIRED ones must be there, OPTIONAL ones may be. A field in neither is refused
# (``unknown_field``), so nothing a peer sends is read unchecked. Values that are
# lists or maps are checked further by the code that reads them (``parts``, ``shm``).
META_REQUIRED: dict[MsgType, dict[str, Expected]] = {
    MsgType.HELLO: {"device": str, "host": str, "software": str, "pid": int},
    MsgType.WELCOME: {"heartbeat_interval": float, "heartbeat_timeout": float},
    MsgType.HEARTBEAT: {"busy": bool},
    MsgType.HEARTBEAT_ACK: {},
    MsgType.BYE: {},
    MsgType.WORK: {
        "mode": str,
        "task": str,
        "task_params": dict,
        "train": dict,
        "shard": list,
        "seed": int,
    },
    MsgType.UPDATE: {"num_samples": int, "loss": float, "kind": str, "train_seconds": float},
    MsgType.OFFER: {"bytes": int},
    MsgType.GRANT: {},
    MsgType.ACK: {},
    MsgType.NACK: {"reason": str, "detail": str},
    MsgType.REQUEST: {"op": str, "args": dict},
    MsgType.REPLY: {"ok": bool, "data": dict, "code": str, "error": str},
    MsgType.EXCHANGE: {"stage": str, "data": dict},
}
META_OPTIONAL: dict[MsgType, dict[str, Expected]] = {
    MsgType.HELLO: {
        "shm": dict,  # this host's shared-memory probe (``shm.LocalProbe``)
        "prepares": bool,  # it builds the jobs WELCOME names before it takes their work
    },
    MsgType.WELCOME: {
        "slot": int,
        "software": str,
        "shm": bool,
        "jobs": list,  # the jobs served: [{job, task, task_params, seed, shard}, ...]
    },
    MsgType.HEARTBEAT: {"preparing": bool},  # still building the jobs WELCOME named
    MsgType.WORK: {
        "codecs": list,  # the job's update codec chain: compress the update through it
        "downlink": bool,  # the model comes against a reference the worker holds
        "delta_from": int,  # ... as a delta from that version
        "shared": dict,  # ... or to be read from the coordinator's segment here
        "clients": list,  # virtual clients: [[client, local epochs], ...], an update each
        "epochs": int,  # a straggler: this many local epochs instead of [train] local_epochs
        "collective": dict,  # a collective rule's generation: {generation, rank, world, ...}
        "privacy": dict,  # the job's privacy mechanism's worker settings: {mechanism, ...}
    },
    MsgType.UPDATE: {
        "part": list,  # [index, count]: one part of an update sent in parts
        "data_size": int,  # the samples this worker (or virtual client) holds for the job
        "client": int,  # the virtual client this update is of
        "metrics": dict,  # a task's own training loop's extra figures: {name: number}
        "collective": dict,  # a collective member's report: {generation, step, end, ...}
        "privacy": dict,  # what the worker's privacy step says of the update: {below_clip}
    },
    MsgType.OFFER: {"parts": bool},  # the update may be sent in parts
    MsgType.GRANT: {"part": list, "segments": list},  # send that part: [[name, start, stop], ...]
}
META_SCHEMA: dict[MsgType, dict[str, Expected]] = {
    t: META_REQUIRED[t] | META_OPTIONAL.get(t, {}) for t in MsgType
}


@dataclass
class Message:
    """One protocol message: the header fields plus named tensors.

    ``version`` is the model version the message refers to: for ``WORK`` the version
    sent, for ``UPDATE`` the version the update was computed against (its base).
    ``key`` is the idempotency key of an update (``worker/job/round``).
    """

    type: MsgType
    job: str = ""
    round: int = 0
    version: int = 0
    sender: str = ""
    key: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, WireTensor] = field(default_factory=dict)
    # Compressed tensors: per tensor name, the codec stages applied, in order (see
    # ``elastic.wire.compression``); their parts travel as ``<name>#<part>`` tensors.
    encodings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# 1 MiB: a multiple of every item size, and the size at which libzmq moves bytes
# fastest on loopback (one 100 MB frame: ~1.7 GB/s; 1 MB frames: ~4.9 GB/s).
CHUNK_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 4 << 30
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 100_000
MAX_NDIM = 16
MAX_NAME = 512
MAX_STAGES = 16

_HEADER_FIELDS: dict[str, type] = {
    "p": int,
    "t": str,
    "job": str,
    "round": int,
    "version": int,
    "sender": str,
    "key": str,
    "meta": dict,
    "tensors": list,
}


def pack(
    msg: Message, specs: list[dict[str, Any]], placement: dict[str, Any] | None = None
) -> bytes:
    """The header of ``msg``, its tensors described by ``specs``; ``placement`` says
    where its frames lie when they travel through shared memory (``elastic.wire.shm``)."""
    header = {
        "p": PROTOCOL_VERSION,
        "t": str(msg.type),
        "job": msg.job,
        "round": msg.round,
        "version": msg.version,
        "sender": msg.sender,
        "key": msg.key,
        "meta": msg.meta,
        "tensors": specs,
    }
    if msg.encodings:
        header["enc"] = msg.encodings
    if placement is not None:
        header["shm"] = placement
    return msgpack.packb(header, use_bin_type=True)


def parse(frame: Any) -> tuple[Message, list[dict[str, Any]]]:
    """The message (without tensors) and its tensor specs, every field checked."""
    msg, specs, _ = parse_placed(frame)
    return msg, specs


def parse_placed(frame: Any) -> tuple[Message, list[dict[str, Any]], Any]:
    """``parse``, plus the shared-memory placement of the frames (None: they follow
    on the socket); the placement is checked by the reader that resolves it."""
    header = _unpack_header(as_buffer(frame))
    msg = _validate_header(header)
    return msg, header["tensors"], header.get("shm")


def as_buffer(frame: Any) -> memoryview:
    """A frame (bytes, memoryview or ``zmq.Frame``) as a flat byte view."""
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer
    try:
        view = memoryview(buf)
    except TypeError as exc:
        raise ProtocolError("bad_frame", f"frame of type {type(frame).__name__}") from exc
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _unpack_header(buf: memoryview) -> dict[str, Any]:
    if len(buf) > MAX_HEADER_BYTES:
        raise ProtocolError("header_too_large", f"{len(buf)} bytes > {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(buf, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for garbage; all mean the same
        raise ProtocolError("malformed_header", f"not msgpack ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise ProtocolError("malformed_header", f"header is a {type(header).__name__}, not a map")
    return header


def _checked(where: str, value: Any, expected: Expected) -> Any:
    """``value`` as ``expected`` (``elastic.typecheck``), or the NACK's reason."""
    try:
        return coerce(value, expected)
    except TypeError:
        raise ProtocolError(
            "bad_field", f"{where} must be {type_names(expected)}, got {type(value).__name__}"
        ) from None


def _validate_header(header: dict[str, Any]) -> Message:
    if "p" not in header:
        raise ProtocolError("missing_field", "header has no protocol version 'p'")
    if header["p"] != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad_version",
            f"protocol version {header['p']!r}, this daemon speaks {PROTOCOL_VERSION}",
        )
    for key, typ in _HEADER_FIELDS.items():
        if key not in header:
            raise ProtocolError("missing_field", f"header field {key!r} is missing")
        _checked(f"header field {key!r}", header[key], typ)
    try:
        mtype = MsgType(header["t"])
    except ValueError:
        raise ProtocolError("unknown_type", f"message type {header['t']!r}") from None
    for key in ("round", "version"):
        if not 0 <= header[key] < 2**63:
            raise ProtocolError("bad_field", f"{key} {header[key]} out of range")
    for key in ("job", "sender", "key"):
        if len(header[key]) > MAX_NAME:
            raise ProtocolError("bad_field", f"{key} longer than {MAX_NAME} characters")
    meta = dict(header["meta"])
    schema = META_SCHEMA[mtype]
    for key in META_REQUIRED[mtype]:
        if key not in meta:
            raise ProtocolError("missing_field", f"{mtype} meta field {key!r} is missing")
    for key, value in meta.items():
        if key not in schema:
            known = ", ".join(schema) or "none"
            raise ProtocolError(
                "unknown_field",
                f"{mtype} meta field {str(key)[:64]!r} is not in protocol {PROTOCOL_VERSION} "
                f"(known: {known})",
            )
        meta[key] = _checked(f"{mtype} meta field {key!r}", value, schema[key])
        if isinstance(meta[key], float) and not math.isfinite(meta[key]) and key != "loss":
            raise ProtocolError(
                "bad_field", f"{mtype} meta field {key!r} is not finite"
            )  # a diverged loss is reported, not hidden
    if mtype is MsgType.UPDATE and meta["num_samples"] < 0:
        raise ProtocolError("bad_field", "num_samples must be >= 0")
    if mtype is MsgType.UPDATE and meta.get("data_size", 1) < 1:
        raise ProtocolError("bad_field", "data_size must be >= 1")
    specs = header["tensors"]
    if len(specs) > MAX_TENSORS:
        raise ProtocolError("bad_field", f"{len(specs)} tensors > {MAX_TENSORS}")
    for i, spec in enumerate(specs):
        _validate_spec(i, spec)
    return Message(
        type=mtype,
        job=header["job"],
        round=header["round"],
        version=header["version"],
        sender=header["sender"],
        key=header["key"],
        meta=meta,
        encodings=_validate_encodings(header.get("enc", {})),
    )


_STAGE_FIELDS: dict[str, type] = {"s": str, "in": str, "shape": list, "dtype": str, "out": list}


def _validate_encodings(enc: Any) -> dict[str, list[dict[str, Any]]]:
    """The shape of the codec records; what they mean is checked when decoding them."""
    _checked("header field 'enc'", enc, dict)
    if len(enc) > MAX_TENSORS:
        raise ProtocolError("bad_encoding", f"{len(enc)} encoded tensors > {MAX_TENSORS}")
    for name, stages in enc.items():
        _checked(f"encoding of {name!r}", stages, list)
        if len(name) > MAX_NAME or not 0 < len(stages) <= MAX_STAGES:
            raise ProtocolError(
                "bad_encoding", f"encoding of {name[:MAX_NAME]!r}: {len(stages)} stages"
            )
        for stage in stages:
            _checked(f"encoding of {name!r}: a stage", stage, dict)
            for key, typ in _STAGE_FIELDS.items():
                if key not in stage:
                    raise ProtocolError(
                        "bad_encoding", f"encoding of {name!r}: a stage has no {key!r}"
                    )
                _checked(f"encoding of {name!r}: stage field {key!r}", stage[key], typ)
            if stage["dtype"] not in DTYPE_SIZES:
                raise ProtocolError(
                    "bad_dtype", f"encoding of {name!r}: unknown dtype {stage['dtype']!r}"
                )
            shape, out = stage["shape"], stage["out"]
            if len(shape) > MAX_NDIM or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
            ):
                raise ProtocolError("bad_shape", f"encoding of {name!r}: shape {shape!r}")
            if not 0 < len(out) <= MAX_STAGES or not all(
                isinstance(p, str) and 0 < len(p) <= MAX_NAME for p in out
            ):
                raise ProtocolError("bad_encoding", f"encoding of {name!r}: bad part names {out!r}")
    return enc


def _validate_spec(i: int, spec: Any) -> None:
    if not isinstance(spec, dict):
        raise ProtocolError("bad_tensor", f"tensor entry {i} is not a map")
    for key, typ in (
        ("name", str),
        ("dtype", str),
        ("shape", list),
        ("nbytes", int),
        ("frames", int),
    ):
        if key not in spec:
            raise ProtocolError("missing_field", f"tensor entry {i} has no {key!r}")
        _checked(f"tensor entry {i} field {key!r}", spec[key], typ)
    name = spec["name"]
    if not name or len(name) > MAX_NAME:
        raise ProtocolError("bad_tensor", f"tensor entry {i} has an empty or overlong name")
    if spec["dtype"] not in DTYPE_SIZES:
        raise ProtocolError("bad_dtype", f"tensor {name!r}: unknown dtype {spec['dtype']!r}")
    shape = spec["shape"]
    if len(shape) > MAX_NDIM or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
    ):
        raise ProtocolError("bad_shape", f"tensor {name!r}: shape {shape!r}")
    itemsize = DTYPE_SIZES[spec["dtype"]]
    if spec["nbytes"] != math.prod(shape) * itemsize:
        raise ProtocolError(
            "shape_mismatch",
            f"tensor {name!r}: shape {shape} of {spec['dtype']} is "
            f"{math.prod(shape) * itemsize} bytes, header says {spec['nbytes']}",
        )
    if not 0 <= spec["frames"] <= max(spec["nbytes"], 0) // itemsize + (spec["nbytes"] == 0):
        raise ProtocolError("frame_count", f"tensor {name!r}: {spec['frames']} frames")
