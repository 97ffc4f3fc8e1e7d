"""Codec chains: compress update tensors on a worker, expand them on the coordinator.

A chain is a list of stages, ``"name"`` or ``"name:arg"`` (``["topk:0.01", "fp16",
"zstd"]``). A tensor enters the first stage as part ``""``; each stage encodes every
part it accepts into named parts (part ``values`` of stage 2 becomes ``values.x``),
and passes the others on. Each application is recorded in the message::

    encodings[tensor] = [{"s": "topk:0.01", "in": "", "shape": [...], "dtype": "float32",
                          "out": ["indices", "values"]}, {"s": "fp16", "in": "values", ...}, ...]

and each final part travels as the tensor ``<tensor>#<part>``. The coordinator runs
the records backwards with fresh codec instances: nothing but the message is needed.
A record naming an unknown codec, parts that do not match, or a decoded size beyond
what the model allows is a ``ProtocolError`` (a NACK), never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from elastic.api import Codec
from elastic.errors import JobSpecError, PluginError, ProtocolError
from elastic.wire.messages import DTYPE_NAMES, DTYPES, Message, WireTensor

__all__ = ["Compressor", "expand", "keeps_finite", "check_chain", "parse_stage", "build_stage", "cast_stage", "cast_record", "SEP"]

SEP = "#"  # between a tensor's name and its part's name on the wire
GROWTH = 4  # a part or intermediate may hold at most this many times its tensor's bytes (+ 4 KiB)


def parse_stage(spec: str) -> tuple[str, str | None]:
    name, _, arg = spec.partition(":")
    return name, (arg if arg else None)


def build_stage(codecs: Any, spec: str) -> Codec:
    name, arg = parse_stage(spec)
    return codecs.get(name)(arg)


def check_chain(codecs: Any, chain: Sequence[str]) -> None:
    """Build every stage once, so an unknown codec or a bad argument fails at submit."""
    for spec in chain:
        build_stage(codecs, spec)


def _join(part: str, name: str) -> str:
    return f"{part}.{name}" if part else name


class Compressor:
    """A worker's chain for one job: each (tensor, stage, part) keeps its own codec
    instance across rounds, so error feedback and warm starts carry over."""

    def __init__(self, codecs: Any, chain: Sequence[str]) -> None:
        check_chain(codecs, chain)
        self.codecs, self.chain = codecs, list(chain)
        self._stages: dict[tuple[str, int, str], Codec] = {}

    def compress(self, tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[dict[str, Any]]]]:
        """(wire tensors, encodings): parts as ``<name>#<part>``, or a tensor as it is
        when no stage accepted it."""
        out: dict[str, torch.Tensor] = {}
        encodings: dict[str, list[dict[str, Any]]] = {}
        for name, tensor in tensors.items():
            parts = {"": tensor.detach()}
            applied: list[dict[str, Any]] = []
            for i, spec in enumerate(self.chain):
                after: dict[str, torch.Tensor] = {}
                for part, value in parts.items():
                    stage = self._stages.get((name, i, part))
                    if stage is None:
                        stage = self._stages[(name, i, part)] = build_stage(self.codecs, spec)
                    if not stage.accepts(value):
                        after[part] = value
                        continue
                    encoded = stage.encode(value)
                    if not encoded or any(not k or "." in k or SEP in k for k in encoded):
                        raise ValueError(f"codec {spec} returned bad part names {sorted(encoded)}")
                    applied.append({"s": spec, "in": part, "shape": list(value.shape), "dtype": DTYPE_NAMES[value.dtype], "out": list(encoded)})
                    after.update({_join(part, k): v for k, v in encoded.items()})
                parts = after
            if applied:
                encodings[name] = applied
                out.update({f"{name}{SEP}{part}": value for part, value in parts.items()})
            else:
                out[name] = tensor
        return out, encodings


def cast_stage(codecs: Any, chain: Sequence[str]) -> Codec | None:
    """The chain's codec when it is one cast (``Codec.cast_from``): it works element
    by element, so a tensor may go through it a block at a time. Else None."""
    if len(chain) != 1:
        return None
    stage = build_stage(codecs, chain[0])
    return stage if getattr(type(stage), "cast_from", None) is not None else None


def cast_record(spec: str, tensor: torch.Tensor) -> list[dict[str, Any]]:
    """The encoding record of ``tensor`` sent through the one-cast chain ``[spec]``
    as the part ``x`` (what ``Compressor.compress`` writes for it)."""
    return [{"s": spec, "in": "", "shape": list(tensor.shape), "dtype": DTYPE_NAMES[tensor.dtype], "out": ["x"]}]


def keeps_finite(codecs: Any, records: Sequence[Mapping[str, Any]], dtype: torch.dtype) -> bool:
    """True when every stage of ``records`` decodes finite parts to finite ``dtype``
    values (``Codec.keeps_finite``): the parts' check then covers the tensor."""
    if dtype not in (torch.float32, torch.float64):
        return False
    try:
        return all(getattr(codecs.get(parse_stage(str(r["s"]))[0]), "keeps_finite", False) is True for r in records)
    except (PluginError, JobSpecError, KeyError):
        return False  # an unknown stage: expand refuses the message anyway


def expand(msg: Message, codecs: Any, template: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, WireTensor]:
    """The message's tensors with every encoded one decoded, checked against
    ``template`` (the model's names, shapes and dtypes)."""
    plain = {name: wt for name, wt in msg.tensors.items() if SEP not in name}
    grouped: dict[str, dict[str, WireTensor]] = {}
    for wire_name, wt in msg.tensors.items():
        if SEP in wire_name:
            name, _, part = wire_name.partition(SEP)
            grouped.setdefault(name, {})[part] = wt
    if set(grouped) != set(msg.encodings):
        raise ProtocolError("bad_encoding", f"encoded parts for {sorted(set(grouped) ^ set(msg.encodings))[:3]} without a record, or records without parts")
    stages: dict[str, Codec] = {}
    for name, records in msg.encodings.items():
        if name in plain or name not in template:
            raise ProtocolError("bad_encoding", f"encoded tensor {name!r} is not one of the model's, or is also sent whole")
        shape, dtype = template[name]
        limit = math.prod(shape) * torch.empty((), dtype=dtype).element_size() * GROWTH + 4096
        top = records[0]
        if top["in"] != "" or tuple(top["shape"]) != shape or DTYPES[top["dtype"]] != dtype:
            raise ProtocolError("bad_encoding", f"tensor {name!r}: the first stage does not start from the model's {list(shape)} {dtype}")
        received = grouped[name]
        if sum(p.nbytes for p in received.values()) > limit:
            raise ProtocolError("too_large", f"tensor {name!r}: encoded parts larger than the tensor allows")
        widened = _widened(name, records, received, shape, dtype, stages, codecs)
        if widened is not None:
            plain[name] = widened
            continue
        parts = {part: wt.to_tensor() for part, wt in received.items()}
        for record in reversed(records):
            spec, source = record["s"], record["in"]
            want_shape, want_dtype = tuple(record["shape"]), DTYPES[record["dtype"]]
            if math.prod(want_shape) * torch.empty((), dtype=want_dtype).element_size() > limit:
                raise ProtocolError("too_large", f"tensor {name!r}: stage {spec} would decode to {list(want_shape)} {want_dtype}")
            stage = _stage(stages, codecs, spec, name)
            try:
                inputs = {k: parts.pop(_join(source, k)) for k in record["out"]}
            except KeyError as exc:
                raise ProtocolError("bad_encoding", f"tensor {name!r}: stage {spec} misses part {exc.args[0]!r}") from None
            try:
                value = stage.decode(inputs, want_shape, want_dtype)
            except (ValueError, RuntimeError, IndexError, KeyError) as exc:
                raise ProtocolError("bad_encoding", f"tensor {name!r}: stage {spec} cannot decode: {exc}") from None
            if tuple(value.shape) != want_shape or value.dtype != want_dtype:
                raise ProtocolError("bad_encoding", f"tensor {name!r}: stage {spec} decoded {list(value.shape)} {value.dtype}")
            parts[source] = value
        if set(parts) != {""}:
            raise ProtocolError("bad_encoding", f"tensor {name!r}: parts {sorted(parts)[:3]} belong to no stage")
        plain[name] = WireTensor.from_tensor(parts[""])
    return plain


def _stage(stages: dict[str, Codec], codecs: Any, spec: str, name: str) -> Codec:
    """The decoding instance of ``spec`` (one per message), or the NACK's reason."""
    try:
        return stages.get(spec) or stages.setdefault(spec, build_stage(codecs, spec))
    except (PluginError, JobSpecError) as exc:
        raise ProtocolError("unknown_codec", f"tensor {name!r}: {exc}") from None


def _widened(
    name: str, records: list[dict[str, Any]], parts: Mapping[str, WireTensor], shape: tuple[int, ...], dtype: torch.dtype, stages: dict[str, Codec], codecs: Any
) -> WireTensor | None:
    """A one-stage cast chain (``Codec.cast_from``) as its received part, to be widened
    where it is used; None when the chain is anything else (decode it)."""
    if len(records) != 1 or set(parts) != {"x"} or records[0]["out"] != ["x"]:
        return None
    part = parts["x"]
    narrow = type(_stage(stages, codecs, records[0]["s"], name)).cast_from
    if narrow is None or part.dtype != narrow or not dtype.is_floating_point or dtype.itemsize < narrow.itemsize:
        return None
    if part.numel != math.prod(shape):
        raise ProtocolError("bad_encoding", f"tensor {name!r}: stage {records[0]['s']} cannot decode: {part.numel} elements for shape {list(shape)}")
    return WireTensor(dtype=dtype, shape=shape, chunks=list(part.chunks), shared=part.shared)
