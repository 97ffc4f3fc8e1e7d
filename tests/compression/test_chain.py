"""CodecChain: parsed once from the job spec, and the coordinator's check that an
update went through exactly that chain (``codec_mismatch`` otherwise)."""

from __future__ import annotations

import pytest
import torch

from elastic.compression.chain import CodecChain
from elastic.errors import JobSpecError, PluginError, ProtocolError
from elastic.plugins import Plugins
from elastic.wire.frames import decode, encode
from elastic.wire.header import Message, MsgType
from elastic.wire.tensors import WireTensor

CODECS = Plugins().codecs
TEMPLATE = {"w": ((40, 30), torch.float32), "b": ((30,), torch.float32), "steps": ((), torch.int64)}


def update_through(chain: list[str], tensors: dict[str, torch.Tensor] | None = None) -> Message:
    """An UPDATE compressed through ``chain``, as a coordinator receives it."""
    torch.manual_seed(0)
    tensors = (
        tensors
        if tensors is not None
        else {"w": torch.randn(40, 30), "b": torch.randn(30), "steps": torch.tensor(3)}
    )
    parts, encodings = CodecChain(CODECS, chain).compressor().compress(tensors)
    msg = Message(
        MsgType.UPDATE,
        meta={"num_samples": 1, "loss": 0.0, "kind": "delta", "train_seconds": 0.0},
        tensors={k: WireTensor.from_tensor(v) for k, v in parts.items()},
        encodings=encodings,
    )
    return decode([bytes(f) for f in encode(msg)])


def test_parsing_builds_every_stage_once_and_names_what_is_wrong() -> None:
    assert CodecChain(CODECS, ["topk:0.1", "fp16", "zstd"]).stages == ("topk:0.1", "fp16", "zstd")
    with pytest.raises(PluginError, match="unknown codec 'lz4'"):
        CodecChain(CODECS, ["fp16", "lz4"])
    with pytest.raises(JobSpecError):
        CodecChain(CODECS, ["topk:2.5"])
    assert (
        CodecChain(CODECS, ["fp16"])
        == CodecChain(CODECS, ("fp16",))
        != CodecChain(CODECS, ["bf16"])
    )
    assert not CodecChain(CODECS) and CodecChain(CODECS, ["zstd"])


def test_a_one_cast_chain_is_known_as_such() -> None:
    assert CodecChain(CODECS, ["fp16"]).cast is not None
    assert CodecChain(CODECS, ["fp16", "zstd"]).cast is None
    assert CodecChain(CODECS, ["zstd"]).cast is None
    record = CodecChain(CODECS, ["bf16"]).cast_record(torch.zeros(3, 2))
    assert record == [{"s": "bf16", "in": "", "shape": [3, 2], "dtype": "float32", "out": ["x"]}]


@pytest.mark.parametrize(
    "chain", [["topk:0.5", "fp16", "zstd"], ["qsgd:4", "zstd"], ["fp16"], ["zstd"], []]
)
def test_an_update_through_the_jobs_own_chain_is_taken(chain: list[str]) -> None:
    msg = update_through(chain)
    out = CodecChain(CODECS, chain).expand(msg, TEMPLATE)
    assert set(out) == set(TEMPLATE) and out["w"].shape == (40, 30)


@pytest.mark.parametrize(
    ("job", "sent", "why"),
    [
        (["fp16"], ["zstd"], "went through 'zstd'; job takes the chain \\['fp16'\\]"),
        (["fp16"], ["bf16"], "went through 'bf16'"),
        (
            ["topk:0.5", "zstd"],
            ["topk:0.9", "zstd"],
            "went through 'topk:0.9'",
        ),  # another argument is another codec
        (
            ["fp16", "zstd"],
            ["zstd", "fp16"],
            "tensor 'w' skipped stage 'fp16'",
        ),  # out of order: zstd first took it all
        (
            ["fp16", "zstd"],
            ["fp16"],
            "part 'x' of tensor 'w' skipped stage 'zstd'",
        ),  # a stage left out
        ([], ["fp16"], "job takes no compression"),
        (
            ["fp16"],
            [],
            "tensor 'w' skipped stage 'fp16'",
        ),  # fp16 takes float tensors: they must go through it
    ],
)
def test_an_update_through_any_other_chain_is_a_codec_mismatch(
    job: list[str], sent: list[str], why: str
) -> None:
    msg = update_through(sent)
    with pytest.raises(ProtocolError, match=why) as caught:
        CodecChain(CODECS, job).expand(msg, TEMPLATE)
    assert caught.value.reason == "codec_mismatch"


def test_a_tensor_no_stage_takes_may_come_as_it_is() -> None:
    # fp16 takes floating point only: the int64 step counter travels as it is.
    msg = update_through(["fp16"])
    assert "steps" in msg.tensors and "steps" not in msg.encodings
    assert CodecChain(CODECS, ["fp16"]).expand(msg, TEMPLATE)["steps"].to_tensor().item() == 3
    # powersgd takes matrices only: the bias goes on to zstd (a later stage), which is fine.
    msg = update_through(["powersgd:2", "zstd"])
    assert [r["s"] for r in msg.encodings["b"]] == ["zstd"]
    CodecChain(CODECS, ["powersgd:2", "zstd"]).expand(msg, TEMPLATE)
