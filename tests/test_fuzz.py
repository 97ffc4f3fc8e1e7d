"""Fuzzing, 10 000 cases each: the wire decoder (with compressed tensors), the job-spec
parser and the control API. Each may refuse, with its one error type, and nothing
else; the saved corpus in ``tests/corpus/`` is replayed first."""

from __future__ import annotations

import math
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastic.compression.chain import CodecChain, expand
from elastic.config import CoordinatorConfig
from elastic.coordinator.daemon import Coordinator
from elastic.errors import JobSpecError, ProtocolError
from elastic.jobspec import parse_job_spec
from elastic.plugins import Plugins
from elastic.wire.frames import decode, encode
from elastic.wire.header import Message, MsgType
from elastic.wire.tensors import WireTensor
from tests.wire.test_frames import VALID, as_bytes, mutate

pytestmark = pytest.mark.slow
CASES = 10_000
FUZZ = settings(
    max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
CORPUS = Path(__file__).parent / "corpus"
CODECS = Plugins().codecs


def compressed() -> list[bytes]:
    parts, encodings = (
        CodecChain(CODECS, ["topk:0.5", "fp16", "zstd"])
        .compressor()
        .compress({"w": torch.randn(6, 5), "b": torch.randn(5)})
    )
    msg = Message(
        MsgType.UPDATE,
        job="j",
        round=1,
        sender="w",
        key="w/j/1",
        meta={"num_samples": 3, "loss": 0.1, "kind": "gradient", "train_seconds": 0.1},
        tensors={k: WireTensor.from_tensor(v) for k, v in parts.items()},
        encodings=encodings,
    )
    return as_bytes(encode(msg))


SEEDS = [*VALID, compressed()]
TEMPLATE = {"w": ((6, 5), torch.float32), "b": ((5,), torch.float32)}


def decode_and_expand(frames: list[bytes]) -> None:
    """What the coordinator does with an update: decode, then expand its codecs."""
    try:
        msg = decode(frames)
        if msg.encodings:
            for wt in expand(msg, CODECS, TEMPLATE).values():
                assert wt.to_tensor().numel() == wt.numel
    except ProtocolError:
        pass


def test_the_corpus_replays() -> None:
    files = sorted(CORPUS.glob("decode-*.msgpack"))
    assert len(files) >= 5
    for path in files:
        decode_and_expand(msgpack.unpackb(path.read_bytes()))


@FUZZ
@given(st.data())
def test_decode_and_expand(data: st.DataObject) -> None:
    decode_and_expand(mutate(data.draw(st.sampled_from(SEEDS)), data))


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=12),
)
TABLE_KEYS = [
    "id",
    "task",
    "rule",
    "rounds",
    "min_workers",
    "max_workers",
    "fraction",
    "round_timeout",
    "eval_every",
    "seed",
    "partitions",
    "local_epochs",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "prox_mu",
    "every",
    "keep",
    "update",
    "model",
    "max_norm",
    "norm_action",
    "x",
]
VALUES = st.one_of(
    SCALARS,
    st.lists(
        st.one_of(st.text(max_size=10), st.sampled_from(["fp16", "topk:0.1", "zstd", "qsgd:4"])),
        max_size=4,
    ),
)
SPECS = st.dictionaries(
    st.sampled_from(["job", "task", "rule", "train", "checkpoint", "compression", "limits", "jbo"]),
    st.one_of(st.dictionaries(st.sampled_from(TABLE_KEYS), VALUES, max_size=6), SCALARS),
    max_size=6,
)


@FUZZ
@given(SPECS)
def test_job_spec_parser(raw: dict) -> None:
    try:
        spec = parse_job_spec(raw)
    except JobSpecError as exc:
        assert str(exc) and "\n" not in str(exc)  # one clear line
        return
    assert spec.rounds >= 1 and spec.min_workers >= 1 and math.isfinite(spec.round_timeout)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Coordinator:
    spec = parse_job_spec(
        {
            "job": {"id": "lin", "task": "linreg", "rule": "fedavg", "rounds": 5},
            "task": {"samples": 40},
        }
    )
    config = CoordinatorConfig(
        bind="tcp://127.0.0.1:0", state_dir=tmp_path_factory.mktemp("state"), insecure=True
    )
    config.validate()
    c = Coordinator(config, Plugins(), [spec])
    yield c
    c.sock.close(linger=0)
    c.control_sock.close(linger=0)


OPS = st.one_of(
    st.sampled_from(
        [
            "ls",
            "status",
            "submit",
            "pause",
            "resume",
            "finish",
            "cancel",
            "export",
            "logs",
            "members",
            "report",
        ]
    ),
    st.text(max_size=8),
)
ARGS = st.dictionaries(
    st.sampled_from(["job", "since", "spec", "source", "default_id", "x"]),
    st.one_of(SCALARS, st.sampled_from(["lin", "nope"]), SPECS),
    max_size=4,
)


@FUZZ
@given(op=OPS, args=ARGS, garbage=st.booleans(), data=st.data())
def test_control_api(
    coordinator: Coordinator, op: str, args: dict, garbage: bool, data: st.DataObject
) -> None:
    request = Message(MsgType.REQUEST, key="k", meta={"op": op, "args": args})
    frames = as_bytes(encode(request))
    if garbage:
        frames = mutate(frames, data)
    try:
        msg = decode(frames, max_message_bytes=64 << 20)
    except ProtocolError:
        return
    reply = coordinator.control.handle(msg)
    assert reply.type is MsgType.REPLY
    assert reply.meta["ok"] or (reply.meta["code"] and reply.meta["error"])
    assert reply.meta["code"] != "internal", reply.meta["error"]  # no bug on the way
    decode(as_bytes(encode(reply)), check_finite=False)  # and the reply is itself valid
