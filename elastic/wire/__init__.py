"""The wire protocol: msgpack headers plus zero-copy tensor frames over ZeroMQ."""

from elastic.wire.frames import CHUNK_BYTES, decode, encode
from elastic.wire.messages import PROTOCOL_VERSION, Message, MsgType, WireTensor

__all__ = ["CHUNK_BYTES", "PROTOCOL_VERSION", "Message", "MsgType", "WireTensor", "decode", "encode"]
