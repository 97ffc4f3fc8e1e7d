"""Codec chains: compress tensors on a worker, expand them on the coordinator.

A chain is a list of stages, ``"name"`` or ``"name:arg"`` (``["topk:0.01", "fp16",
"zstd"]``). A tensor enters the first stage as part ``""``; each stage encodes every
part it accepts into named parts (part ``values`` of stage 2 becomes ``values.x``),
and passes the others on. Each application is recorded in the message::

    encodings[tensor] = [{"s": "topk:0.01", "in": "", "shape": [...], "dtype": "float32",
                          "out": ["indices", "values"]}, {"s": "fp16", "in": "values", ...}, ...]

and each final part travels as the tensor ``<tensor>#<part>``. The coordinator runs
the records backwards with fresh codec instances: nothing but the message is needed.

A job's chain is parsed once into a ``CodecChain``: the coordinator checks every
update's records against it (``codec_mismatch`` when a worker used any other
codecs), the worker compresses through it, the downlink encodes the model with it.
A record naming an unknown codec, parts that do not match, or a decoded size beyond
what the model allows is a ``ProtocolError`` (a NACK), never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, Protocol

import torch

from elastic.compression.codec import Codec
from elastic.errors import JobSpecError, PluginError, ProtocolError
from elastic.wire.header import Message
from elastic.wire.tensors import DTYPE_NAMES, DTYPES, WireTensor

__all__ = ["CodecChain", "CodecLookup", "Compressor", "Template", "expand", "SEP"]

SEP = "#"  # between a tensor's name and its part's name on the wire
GROWTH = 4  # a part or intermediate may hold at most this many times its tensor's bytes (+ 4 KiB)
Records = list[dict[str, Any]]
Template = Mapping[str, tuple[tuple[int, ...], torch.dtype]]  # the model's names, shapes, dtypes


class CodecLookup(Protocol):
    """Codec classes by name: the plugin manager's codec registry."""

    def get(self, name: str) -> type[Codec]: ...


def _parse_stage(spec: str) -> tuple[str, str | None]:
    name, _, arg = spec.partition(":")
    return name, (arg if arg else None)


def _build(codecs: CodecLookup, spec: str) -> Codec:
    name, arg = _parse_stage(spec)
    return codecs.get(name)(arg)


class CodecChain:
    """A job's codec chain, parsed once: ``CodecChain(codecs, ["topk:0.01", "zstd"])``
    builds every stage, so an unknown codec (``PluginError``) or a bad argument
    (``JobSpecError``) fails when the job is submitted. An empty chain sends tensors
    as they are. Chains are equal when their stages are."""

    def __init__(self, codecs: CodecLookup, stages: Sequence[str] = ()) -> None:
        self.codecs = codecs
        self.stages: tuple[str, ...] = tuple(str(s) for s in stages)
        for spec in self.stages:
            _build(codecs, spec)

    def __bool__(self) -> bool:
        return bool(self.stages)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CodecChain) and other.stages == self.stages

    def __hash__(self) -> int:
        return hash(self.stages)

    def __repr__(self) -> str:
        return f"CodecChain({list(self.stages)})"

    def build(self, spec: str) -> Codec:
        """A fresh instance of one of the chain's stages."""
        return _build(self.codecs, spec)

    def compressor(self) -> Compressor:
        """A compressor for one job on one worker (it keeps the codecs' state)."""
        return Compressor(self)

    @cached_property
    def cast(self) -> Codec | None:
        """The chain's codec when the chain is one cast (``Codec.cast_from``): it works
        element by element, so a tensor may go through it a block at a time."""
        if len(self.stages) != 1:
            return None
        stage = self.build(self.stages[0])
        return stage if type(stage).cast_from is not None else None

    def cast_record(self, tensor: torch.Tensor) -> Records:
        """The encoding record of ``tensor`` sent through this one-cast chain as the
        part ``x`` (what ``Compressor.compress`` writes for it)."""
        return [
            {
                "s": self.stages[0],
                "in": "",
                "shape": list(tensor.shape),
                "dtype": DTYPE_NAMES[tensor.dtype],
                "out": ["x"],
            }
        ]

    def check(self, msg: Message, template: Template) -> None:
        """``ProtocolError("codec_mismatch")`` unless ``msg``'s tensors went through
        this chain as ``Compressor`` sends them: the records replayed stage by stage
        name the chain's stages in its order, and no part (nor whole tensor) passed
        a stage that takes it. Malformed records are left to ``expand``."""
        for name, records in msg.encodings.items():
            born = {"": -1}  # part -> the stage that made it
            at = 0
            for record in records:
                spec, part = record["s"], record["in"]
                try:
                    at = self.stages.index(spec, at)
                except ValueError:
                    expected = f"the chain {list(self.stages)}" if self.stages else "no compression"
                    raise ProtocolError(
                        "codec_mismatch",
                        f"tensor {name!r} went through {spec!r}; job takes {expected}: compress "
                        "with the chain in the WORK",
                    ) from None
                if part not in born:
                    return  # not a part at this point: expand refuses it
                self._passed(
                    name,
                    part,
                    born.pop(part),
                    at,
                    (tuple(record["shape"]), DTYPES[record["dtype"]]),
                )
                born.update({_join(part, out): at for out in record["out"]})
            for part, stage in born.items():
                wt = msg.tensors.get(f"{name}{SEP}{part}")
                if wt is not None:
                    self._passed(name, part, stage, len(self.stages), (wt.shape, wt.dtype))
        for name, wt in msg.tensors.items():
            if SEP not in name and name not in msg.encodings:
                self._passed(
                    name, "", -1, len(self.stages), template.get(name, (wt.shape, wt.dtype))
                )

    def _passed(
        self,
        name: str,
        part: str,
        after: int,
        before: int,
        spec: tuple[tuple[int, ...], torch.dtype],
    ) -> None:
        """Refuse a part of that shape and dtype that went past stages ``after + 1``
        to ``before - 1`` untouched when one of them takes it."""
        for i in range(after + 1, before):
            if _takes(self._probes[i], spec):
                what = f"part {part!r} of tensor {name!r}" if part else f"tensor {name!r}"
                raise ProtocolError(
                    "codec_mismatch",
                    f"{what} skipped stage {self.stages[i]!r}, which takes it; job takes the "
                    f"chain {list(self.stages)}",
                )

    @cached_property
    def _probes(self) -> list[Codec]:
        """One instance of each stage, asked only what it accepts."""
        return [self.build(spec) for spec in self.stages]

    def expand(self, msg: Message, template: Template) -> dict[str, WireTensor]:
        """The message's tensors decoded (``expand``), once its records are checked
        against this chain."""
        self.check(msg, template)
        return expand(msg, self.codecs, template)

    def keeps_finite(self, records: Sequence[Mapping[str, Any]], dtype: torch.dtype) -> bool:
        """True when every stage of ``records`` decodes finite parts to finite ``dtype``
        values (``Codec.keeps_finite``): the parts' check then covers the tensor."""
        if dtype not in (torch.float32, torch.float64):
            return False
        try:
            return all(
                self.codecs.get(_parse_stage(str(r["s"]))[0]).keeps_finite is True for r in records
            )
        except (PluginError, JobSpecError, KeyError):
            return False  # an unknown stage: expand refuses the message anyway


def _takes(codec: Codec, spec: tuple[tuple[int, ...], torch.dtype]) -> bool:
    """Whether ``codec`` accepts a tensor of that shape and dtype (asked of a tensor
    with no storage); a codec that needs the values to say is given the benefit."""
    shape, dtype = spec
    try:
        return bool(codec.accepts(torch.empty(shape, dtype=dtype, device="meta")))
    except Exception:  # noqa: BLE001 - a plugin's accepts may look at values it cannot see here
        return False


def _join(part: str, name: str) -> str:
    return f"{part}.{name}" if part else name


class Compressor:
    """A worker's chain for one job: each (tensor, stage, part) keeps its own codec
    instance across rounds, so error feedback and warm starts carry over."""

    def __init__(self, chain: CodecChain) -> None:
        self.chain = chain
        self._stages: dict[tuple[str, int, str], Codec] = {}

    def compress(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, list[dict[str, Any]]]]:
        """(wire tensors, encodings): parts as ``<name>#<part>``, or a tensor as it is
        when no stage accepted it."""
        out: dict[str, torch.Tensor] = {}
        encodings: dict[str, list[dict[str, Any]]] = {}
        for name, tensor in tensors.items():
            parts = {"": tensor.detach()}
            applied: list[dict[str, Any]] = []
            for i, spec in enumerate(self.chain.stages):
                after: dict[str, torch.Tensor] = {}
                for part, value in parts.items():
                    stage = self._stages.get((name, i, part))
                    if stage is None:
                        stage = self._stages[(name, i, part)] = self.chain.build(spec)
                    if not stage.accepts(value):
                        after[part] = value
                        continue
                    encoded = stage.encode(value)
                    if not encoded or any(not k or "." in k or SEP in k for k in encoded):
                        raise ValueError(f"codec {spec} returned bad part names {sorted(encoded)}")
                    applied.append(
                        {
                            "s": spec,
                            "in": part,
                            "shape": list(value.shape),
                            "dtype": DTYPE_NAMES[value.dtype],
                            "out": list(encoded),
                        }
                    )
                    after.update({_join(part, k): v for k, v in encoded.items()})
                parts = after
            if applied:
                encodings[name] = applied
                out.update({f"{name}{SEP}{part}": value for part, value in parts.items()})
            else:
                out[name] = tensor
        return out, encodings


def expand(msg: Message, codecs: CodecLookup, template: Template) -> dict[str, WireTensor]:
    """The message's tensors with every encoded one decoded, checked against
    ``template`` (the model's names, shapes and dtypes). It checks the records' form,
    not which codecs they name: ``CodecChain.expand`` checks that too."""
    plain = {name: wt for name, wt in msg.tensors.items() if SEP not in name}
    grouped: dict[str, dict[str, WireTensor]] = {}
    for wire_name, wt in msg.tensors.items():
        if SEP in wire_name:
            name, _, part = wire_name.partition(SEP)
            grouped.setdefault(name, {})[part] = wt
    if set(grouped) != set(msg.encodings):
        raise ProtocolError(
            "bad_encoding",
            f"encoded parts for {sorted(set(grouped) ^ set(msg.encodings))[:3]} without a record, "
            "or records without parts",
        )
    stages: dict[str, Codec] = {}
    for name, records in msg.encodings.items():
        if name in plain or name not in template:
            raise ProtocolError(
                "bad_encoding",
                f"encoded tensor {name!r} is not one of the model's, or is also sent whole",
            )
        shape, dtype = template[name]
        limit = math.prod(shape) * dtype.itemsize * GROWTH + 4096
        top = records[0]
        if top["in"] != "" or tuple(top["shape"]) != shape or DTYPES[top["dtype"]] != dtype:
            raise ProtocolError(
                "bad_encoding",
                f"tensor {name!r}: the first stage does not start from the model's {list(shape)} "
                f"{dtype}",
            )
        received = grouped[name]
        if sum(p.nbytes for p in received.values()) > limit:
            raise ProtocolError(
                "too_large", f"tensor {name!r}: encoded parts larger than the tensor allows"
            )
        widened = _widened(name, records, received, shape, dtype, stages, codecs)
        if widened is not None:
            plain[name] = widened
            continue
        parts = {part: wt.to_tensor() for part, wt in received.items()}
        for record in reversed(records):
            spec, source = record["s"], record["in"]
            want_shape, want_dtype = tuple(record["shape"]), DTYPES[record["dtype"]]
            if math.prod(want_shape) * want_dtype.itemsize > limit:
                raise ProtocolError(
                    "too_large",
                    f"tensor {name!r}: stage {spec} would decode to {list(want_shape)} "
                    f"{want_dtype}",
                )
            stage = _stage(stages, codecs, spec, name)
            try:
                inputs = {k: parts.pop(_join(source, k)) for k in record["out"]}
            except KeyError as exc:
                raise ProtocolError(
                    "bad_encoding", f"tensor {name!r}: stage {spec} misses part {exc.args[0]!r}"
                ) from None
            try:
                value = stage.decode(inputs, want_shape, want_dtype)
            except (ValueError, RuntimeError, IndexError, KeyError) as exc:
                raise ProtocolError(
                    "bad_encoding", f"tensor {name!r}: stage {spec} cannot decode: {exc}"
                ) from None
            if tuple(value.shape) != want_shape or value.dtype != want_dtype:
                raise ProtocolError(
                    "bad_encoding",
                    f"tensor {name!r}: stage {spec} decoded {list(value.shape)} {value.dtype}",
                )
            parts[source] = value
        if set(parts) != {""}:
            raise ProtocolError(
                "bad_encoding", f"tensor {name!r}: parts {sorted(parts)[:3]} belong to no stage"
            )
        plain[name] = WireTensor.from_tensor(parts[""])
    return plain


def _stage(stages: dict[str, Codec], codecs: CodecLookup, spec: str, name: str) -> Codec:
    """The decoding instance of ``spec`` (one per message), or the NACK's reason."""
    try:
        return stages.get(spec) or stages.setdefault(spec, _build(codecs, spec))
    except (PluginError, JobSpecError) as exc:
        raise ProtocolError("unknown_codec", f"tensor {name!r}: {exc}") from None


def _widened(
    name: str,
    records: Records,
    parts: Mapping[str, WireTensor],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    stages: dict[str, Codec],
    codecs: CodecLookup,
) -> WireTensor | None:
    """A one-stage cast chain (``Codec.cast_from``) as its received part, to be widened
    where it is used; None when the chain is anything else (decode it)."""
    if len(records) != 1 or set(parts) != {"x"} or records[0]["out"] != ["x"]:
        return None
    part = parts["x"]
    narrow = type(_stage(stages, codecs, records[0]["s"], name)).cast_from
    if (
        narrow is None
        or part.dtype != narrow
        or not dtype.is_floating_point
        or dtype.itemsize < narrow.itemsize
    ):
        return None
    if part.numel != math.prod(shape):
        raise ProtocolError(
            "bad_encoding",
            f"tensor {name!r}: stage {records[0]['s']} cannot decode: {part.numel} elements for "
            f"shape {list(shape)}",
        )
    return WireTensor(dtype=dtype, shape=shape, chunks=list(part.chunks), shared=part.shared)
