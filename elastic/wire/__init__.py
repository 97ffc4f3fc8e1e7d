"""The wire protocol: msgpack headers plus zero-copy tensor frames over ZeroMQ.

The names below load on first use, so that importing ``elastic.wire.header`` (which
a control client needs) does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CHUNK_BYTES",
    "PROTOCOL_VERSION",
    "Message",
    "MsgType",
    "WireTensor",
    "decode",
    "encode",
]
_HOME = {
    "CHUNK_BYTES": "header",
    "PROTOCOL_VERSION": "header",
    "Message": "header",
    "MsgType": "header",
    "WireTensor": "tensors",
    "decode": "frames",
    "encode": "frames",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    return getattr(importlib.import_module(f"elastic.wire.{_HOME[name]}"), name)
