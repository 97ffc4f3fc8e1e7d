"""encode/decode: round trips, zero-copy, and every way a message can be wrong."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastic.errors import ProtocolError
from elastic.wire import CHUNK_BYTES, Message, MsgType, WireTensor, decode, encode
from elastic.wire.tensors import DTYPES


def update(**tensors: torch.Tensor) -> Message:
    return Message(
        MsgType.UPDATE,
        job="j",
        round=3,
        version=2,
        sender="w1",
        key="w1/j/3",
        meta={"num_samples": 10, "loss": 0.5, "kind": "delta", "train_seconds": 0.1},
        tensors={k: WireTensor.from_tensor(v) for k, v in tensors.items()},
    )


def as_bytes(frames: list) -> list[bytes]:
    return [bytes(f) for f in frames]


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_round_trip_every_dtype(dtype: torch.dtype) -> None:
    t = (torch.arange(24) % 2).to(dtype).reshape(2, 3, 4)
    got = decode(as_bytes(encode(update(w=t))))
    assert got.tensors["w"].dtype == dtype
    assert torch.equal(got.tensors["w"].to_tensor(), t)


def test_round_trip_header_fields_and_odd_shapes() -> None:
    msg = update(scalar=torch.tensor(2.5), empty=torch.zeros(0, 3), wide=torch.randn(5, 7).t())
    got = decode(as_bytes(encode(msg)))
    assert (got.type, got.job, got.round, got.version, got.sender, got.key) == (
        MsgType.UPDATE,
        "j",
        3,
        2,
        "w1",
        "w1/j/3",
    )
    assert got.meta == msg.meta
    assert got.tensors["scalar"].to_tensor().item() == 2.5
    assert got.tensors["empty"].to_tensor().shape == (0, 3)
    assert torch.equal(got.tensors["wide"].to_tensor(), msg.tensors["wide"].to_tensor())


def test_big_tensor_is_cut_into_chunk_frames_that_alias_its_memory() -> None:
    t = torch.randn(CHUNK_BYTES // 4 * 2 + 5)  # two full frames and a bit
    frames = encode(update(w=t))
    assert [len(f) for f in frames[1:]] == [CHUNK_BYTES, CHUNK_BYTES, 20]
    t[0] = 42.0  # frames are views of the tensor, not copies
    assert torch.frombuffer(frames[1], dtype=torch.float32)[0].item() == 42.0


def test_decode_is_zero_copy_and_folds_frame_by_frame() -> None:
    t = torch.randn(CHUNK_BYTES // 4 * 3)
    frames = [bytearray(f) for f in encode(update(w=t))]
    got = decode(frames)
    wt = got.tensors["w"]
    assert len(wt.chunks) == 3
    frames[1][0:4] = bytearray(torch.tensor([7.0]).numpy().tobytes())
    assert wt.chunks[0][0].item() == 7.0  # the chunk is a view of the received frame
    acc = torch.ones(t.numel())
    wt.add_to(acc, alpha=2.0)
    expected = torch.ones(t.numel()) + 2 * wt.to_tensor()
    assert torch.equal(acc, expected)


def test_zmq_frames_decode_without_copy() -> None:
    zmq = pytest.importorskip("zmq")
    t = torch.randn(1000)
    frames = [zmq.Frame(bytes(f)) for f in encode(update(w=t))]
    assert torch.equal(decode(frames).tensors["w"].to_tensor(), t)


def header_of(msg: Message) -> dict:
    return msgpack.unpackb(encode(msg)[0])


def with_header(msg: Message, **changes) -> list[bytes]:
    frames = as_bytes(encode(msg))
    header = msgpack.unpackb(frames[0])
    for key, value in changes.items():
        if value is KeyError:
            del header[key]
        else:
            header[key] = value
    return [msgpack.packb(header), *frames[1:]]


def reason(frames: list, **kwargs) -> str:
    with pytest.raises(ProtocolError) as err:
        decode(frames, **kwargs)
    return err.value.reason


def test_rejects_wrong_version_unknown_type_missing_field() -> None:
    msg = update(w=torch.ones(4))
    assert reason(with_header(msg, p=99)) == "bad_version"
    assert reason(with_header(msg, p=KeyError)) == "missing_field"
    assert reason(with_header(msg, t="EXPLODE")) == "unknown_type"
    assert reason(with_header(msg, job=KeyError)) == "missing_field"
    assert reason(with_header(msg, round=-1)) == "bad_field"
    assert reason(with_header(msg, round=True)) == "bad_field"
    assert reason(with_header(msg, meta={"loss": 0.1})) == "missing_field"
    assert reason(with_header(msg, meta={**msg.meta, "num_samples": "ten"})) == "bad_field"


def test_every_meta_key_is_declared_and_checked() -> None:
    msg = update(w=torch.ones(4))
    with pytest.raises(
        ProtocolError,
        match="'relative' is not in protocol 1 \\(known: num_samples, loss, kind, train_seconds, "
        "part, data_size, client, metrics, collective, privacy\\)",
    ) as err:
        decode(with_header(msg, meta={**msg.meta, "relative": True}))
    assert err.value.reason == "unknown_field"
    assert (
        reason(with_header(msg, meta={**msg.meta, "part": "0/4"})) == "bad_field"
    )  # optional, and typed
    assert decode(with_header(msg, meta={**msg.meta, "part": [0, 4]})).meta["part"] == [0, 4]
    welcome = Message(
        MsgType.WELCOME, meta={"heartbeat_interval": 1, "heartbeat_timeout": 3.0, "slot": 2}
    )
    got = decode(encode(welcome)).meta
    assert (
        got["heartbeat_interval"] == 1.0 and type(got["heartbeat_interval"]) is float
    )  # an int where a float is declared
    assert (
        reason(encode(Message(MsgType.WELCOME, meta={**welcome.meta, "slot": True}))) == "bad_field"
    )  # a bool is no int
    assert (
        reason(encode(Message(MsgType.OFFER, meta={"bytes": 5, "parts": 1}))) == "bad_field"
    )  # nor an int a bool


def test_rejects_dtype_shape_and_length_mismatches() -> None:
    msg = update(w=torch.ones(4))
    spec = header_of(msg)["tensors"][0]
    assert reason(with_header(msg, tensors=[{**spec, "dtype": "complex128"}])) == "bad_dtype"
    assert reason(with_header(msg, tensors=[{**spec, "shape": [5]}])) == "shape_mismatch"
    assert reason(with_header(msg, tensors=[{**spec, "shape": [-4]}])) == "bad_shape"
    assert reason(with_header(msg, tensors=[{**spec, "frames": 2}])) == "frame_count"
    frames = as_bytes(encode(msg))
    assert reason([frames[0], frames[1][:-4]]) == "length_mismatch"
    assert reason([frames[0], frames[1][:-1]]) == "frame_length"
    assert reason([frames[0]]) == "frame_count"
    assert reason(with_header(msg, tensors=[spec, spec])) == "frame_count"


def test_rejects_non_finite_updates_but_not_models() -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(100)
        t[57] = bad
        assert reason(as_bytes(encode(update(w=t)))) == "non_finite"
    t = torch.full((10,), 3e38)  # finite, but its sum overflows: must not be a false alarm
    assert decode(as_bytes(encode(update(w=t)))).tensors["w"].is_finite()
    work = Message(
        MsgType.WORK,
        meta={
            "mode": "train",
            "task": "t",
            "task_params": {},
            "train": {},
            "shard": [0, 1],
            "seed": 0,
        },
        tensors={"w": WireTensor.from_tensor(torch.tensor([math.nan]))},
    )
    assert decode(as_bytes(encode(work))).type is MsgType.WORK


def test_rejects_oversized_and_garbage() -> None:
    msg = update(w=torch.ones(1000))
    assert reason(as_bytes(encode(msg)), max_message_bytes=100) == "too_large"
    assert reason([]) == "empty"
    assert reason([b"\xc1\xff garbage"]) == "malformed_header"
    assert reason([msgpack.packb([1, 2, 3])]) == "malformed_header"
    assert reason([b"x" * (2 << 20)]) == "header_too_large"


# ------------------------------------------------------------------- fuzzing --

VALID = [
    as_bytes(encode(update(w=torch.randn(3, 4), b=torch.zeros(2, dtype=torch.int64)))),
    as_bytes(
        encode(
            Message(
                MsgType.HELLO,
                sender="w",
                meta={"device": "cpu", "host": "h", "software": "0", "pid": 1},
            )
        )
    ),
    as_bytes(encode(Message(MsgType.NACK, meta={"reason": "r", "detail": "d"}))),
]


def mutate(frames: list[bytes], data: st.DataObject) -> list[bytes]:
    frames = list(frames)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "drop", "dup", "insert", "header"]))
        i = data.draw(st.integers(0, len(frames) - 1)) if frames else 0
        if op == "flip" and frames and frames[i]:
            b = bytearray(frames[i])
            j = data.draw(st.integers(0, len(b) - 1))
            b[j] ^= data.draw(st.integers(1, 255))
            frames[i] = bytes(b)
        elif op == "truncate" and frames:
            frames[i] = frames[i][: data.draw(st.integers(0, len(frames[i])))]
        elif op == "drop" and frames:
            frames.pop(i)
        elif op == "dup" and frames:
            frames.insert(i, frames[i])
        elif op == "insert":
            frames.insert(i, data.draw(st.binary(max_size=64)))
        elif op == "header" and frames:
            try:
                header = msgpack.unpackb(frames[0])
            except Exception:  # an earlier mutation already broke it: nothing to edit
                header = None
            if isinstance(header, dict) and header:
                key = data.draw(st.sampled_from(sorted(header)))
                header[key] = data.draw(
                    st.one_of(
                        st.none(),
                        st.integers(-(2**63), 2**64 - 1),
                        st.floats(),
                        st.text(max_size=5),
                        st.lists(st.integers(-(2**63), 2**63), max_size=3),
                        st.dictionaries(
                            st.text(max_size=3), st.integers(-(2**63), 2**63), max_size=2
                        ),
                    )
                )
                frames[0] = msgpack.packb(header)
    return frames


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_random_frames_only_ever_raise_protocol_error(frames: list[bytes]) -> None:
    try:
        decode(frames)
    except ProtocolError:
        pass


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_valid_frames_only_ever_raise_protocol_error(data: st.DataObject) -> None:
    frames = mutate(data.draw(st.sampled_from(VALID)), data)
    try:
        msg = decode(frames)
    except ProtocolError:
        return
    for wt in msg.tensors.values():  # whatever got through is internally consistent
        assert wt.to_tensor().numel() == wt.numel
