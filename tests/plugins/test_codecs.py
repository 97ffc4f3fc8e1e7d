"""One conformance suite every installed codec passes, plus what each promises."""

from __future__ import annotations

import pytest
import torch
from elastic_plugins import codecs as codecs_module

from elastic.api import Codec
from elastic.compression.chain import CodecChain, expand
from elastic.errors import JobSpecError, ProtocolError
from elastic.plugins import Plugins
from elastic.wire import tensors as wire_tensors
from elastic.wire.frames import decode, encode
from elastic.wire.header import Message, MsgType
from elastic.wire.tensors import WireTensor

ARGS = {"topk": "0.1", "qsgd": "4", "powersgd": "2", "zstd": "3"}  # a typical argument each
CODECS = Plugins().codecs
NAMES = CODECS.names()
SHAPES = [(), (0,), (1,), (7,), (3, 4), (6, 5, 4), (40, 30), (1000,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make(name: str) -> Codec:
    return CODECS.get(name)(ARGS.get(name))


def sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


@pytest.mark.parametrize("name", NAMES)
class TestCodecConformance:
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_round_trip_within_the_stated_bound(self, name: str, dtype: torch.dtype) -> None:
        for shape in SHAPES:
            x = sample(shape, dtype)
            codec = make(name)
            if not codec.accepts(x):
                continue
            y = codec.decode(codec.encode(x), tuple(x.shape), x.dtype)
            assert (tuple(y.shape), y.dtype) == (tuple(x.shape), x.dtype), (shape, dtype)
            error = float((y.double() - x.double()).abs().max()) if x.numel() else 0.0
            bound = make(name).error_bound(x)
            assert error <= bound + 1e-6 * max(1.0, bound), (shape, dtype, error, bound)

    def test_non_contiguous_input(self, name: str) -> None:
        x = sample((8, 6), torch.float32).T  # a transposed view
        codec = make(name)
        if not codec.accepts(x):
            pytest.skip(f"{name} does not take this tensor")
        y = codec.decode(codec.encode(x), tuple(x.shape), x.dtype)
        assert float((y - x).abs().max()) <= make(name).error_bound(x) + 1e-6

    def test_error_feedback_loses_nothing(self, name: str) -> None:
        """Whatever a codec with a residual did not send, it still holds: the sum of
        what arrived plus the residual is the sum of what went in."""
        codec = make(name)
        x = sample((40, 30), torch.float32)
        if not hasattr(codec, "residual") or not codec.accepts(x):
            pytest.skip(f"{name} keeps no residual")
        sent, arrived = (
            torch.zeros(40, 30, dtype=torch.float64),
            torch.zeros(40, 30, dtype=torch.float64),
        )
        for step in range(5):
            g = sample((40, 30), torch.float32, seed=step)
            sent += g.double()
            arrived += codec.decode(codec.encode(g), (40, 30), torch.float32).double()
        residual = codec.residual.reshape(40, 30).double()
        torch.testing.assert_close(arrived + residual, sent, atol=1e-4, rtol=1e-5)

    def test_decode_refuses_parts_that_do_not_fit(self, name: str) -> None:
        codec = make(name)
        x = sample((40, 30), torch.float32)
        if not codec.accepts(x):
            pytest.skip(f"{name} does not take this tensor")
        parts = codec.encode(x)
        first = next(iter(parts))
        parts[first] = parts[first].reshape(-1)[: parts[first].numel() // 2]  # truncated in transit
        with pytest.raises((ValueError, RuntimeError, IndexError)):
            codec.decode(parts, (40, 30), torch.float32)

    @cuda
    @pytest.mark.gpu
    def test_runs_on_cuda_without_moving(self, name: str) -> None:
        x = sample((40, 30), torch.float32).cuda()
        codec = make(name)
        parts = codec.encode(x)
        if not codec.lossless:
            assert all(p.is_cuda for p in parts.values()), {k: p.device for k, p in parts.items()}
        y = codec.decode(parts, (40, 30), torch.float32)
        assert float((y.cpu() - x.cpu()).abs().max()) <= make(name).error_bound(x.cpu()) + 1e-5


def test_qsgd_is_unbiased() -> None:
    x = sample((600,), torch.float32)
    codec = make("qsgd")
    mean = sum(codec.decode(codec.encode(x), (600,), torch.float32) for _ in range(3000)) / 3000
    assert float((mean - x).abs().max()) < 0.05 * float(x.abs().max())


def test_sizes_on_the_wire() -> None:
    x = sample((1000, 100), torch.float32)
    raw = x.numel() * 4

    def size(name: str, arg: str | None) -> int:
        parts = CODECS.get(name)(arg).encode(x)
        return sum(p.numel() * p.element_size() for p in parts.values())

    assert size("fp16", None) == raw // 2 and size("bf16", None) == raw // 2
    assert size("topk", "0.01") == 1000 * 8  # 1 % of the elements: int32 index + float32 value
    assert size("signsgd", None) == raw // 32 + 4
    assert size("qsgd", "4") == raw // 4 + 4 * (x.numel() // 512 + 1)
    assert size("powersgd", "2") == (1000 + 100) * 2 * 4
    assert CODECS.get("zstd")("3").encode(torch.zeros(100_000))["z"].numel() < 1000


def test_bad_arguments_name_the_stage() -> None:
    for name, arg, words in [
        ("topk", None, "needs an argument"),
        ("topk", "x", "not a float"),
        ("qsgd", "16", "out of range"),
        ("fp16", "2", "takes no argument"),
        ("zstd", "30", "out of range"),
    ]:
        with pytest.raises(JobSpecError, match=words):
            CODECS.get(name)(arg)


def chain_message(chain: list[str], tensors: dict[str, torch.Tensor]) -> Message:
    parts, encodings = CodecChain(CODECS, chain).compressor().compress(tensors)
    msg = Message(
        MsgType.UPDATE,
        meta={"num_samples": 1, "loss": 0.0, "kind": "gradient", "train_seconds": 0.0},
        tensors={k: WireTensor.from_tensor(v) for k, v in parts.items()},
        encodings=encodings,
    )
    return decode(encode(msg))  # through the wire format


def test_a_chain_through_the_wire_and_back() -> None:
    tensors = {
        "w": sample((50, 20), torch.float32),
        "b": sample((20,), torch.float32),
        "n": torch.tensor(3.0),
    }
    msg = chain_message(["topk:0.1", "fp16", "zstd"], tensors)
    assert set(msg.encodings) == {"w", "b", "n"} and all(
        name.count("#") == 1 for name in msg.tensors
    )
    assert [r["s"] for r in msg.encodings["w"]] == [
        "topk:0.1",
        "fp16",
        "zstd",
        "zstd",
    ]  # zstd on both parts
    template = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    out = expand(msg, CODECS, template)
    for name, x in tensors.items():
        y = out[name].to_tensor()
        assert y.shape == x.shape and y.dtype == x.dtype
        kept = y != 0
        assert int(kept.sum()) == max(1, -(-x.numel() // 10))  # top 10 %
        torch.testing.assert_close(y[kept], x[kept], rtol=1e-3, atol=1e-3)  # fp16 on the values


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda m: m.encodings["w"][0].update(s="lz4"), "unknown_codec"),
        (lambda m: m.encodings["w"][0].update(shape=[10, 10]), "bad_encoding"),
        (lambda m: m.tensors.pop("w#values"), "bad_encoding"),
        (lambda m: m.encodings["w"][0].update(out=["indices", "values", "extra"]), "bad_encoding"),
        (lambda m: m.encodings.pop("w"), "bad_encoding"),
    ],
)
def test_expand_refuses_bad_records(tamper, reason: str) -> None:  # type: ignore[no-untyped-def]
    msg = chain_message(["topk:0.1"], {"w": sample((50, 20), torch.float32)})
    tamper(msg)
    with pytest.raises(ProtocolError) as err:
        expand(msg, CODECS, {"w": ((50, 20), torch.float32)})
    assert err.value.reason == reason


def test_expand_refuses_a_decompression_bomb() -> None:
    msg = chain_message(["zstd"], {"w": torch.zeros(100)})
    msg.encodings["w"][0]["shape"] = [1 << 30]  # "decode me to 4 GiB"
    with pytest.raises(ProtocolError) as err:
        expand(msg, CODECS, {"w": ((100,), torch.float32)})
    assert err.value.reason == "bad_encoding"  # the first stage must start from the model's shape
    msg = chain_message(["zstd"], {"w": torch.zeros(100)})
    msg.tensors["w#z"] = WireTensor.from_tensor(
        torch.randint(0, 255, (64,), dtype=torch.uint8)
    )  # garbage
    with pytest.raises(ProtocolError) as err:
        expand(msg, CODECS, {"w": ((100,), torch.float32)})
    assert err.value.reason == "bad_encoding"


@pytest.mark.parametrize("chain, narrow", [(["fp16"], torch.float16), (["bf16"], torch.bfloat16)])
@pytest.mark.parametrize("block", [1 << 20, 1536])  # one block a frame; several, the last one short
def test_a_cast_chain_is_folded_as_received_without_a_decoded_copy(
    chain: list[str], narrow: torch.dtype, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wire_tensors, "WIDEN_BLOCK", block)
    x = sample((300, 70), torch.float32) * 1000
    x[0, 0] = 60000.0  # near fp16's top: alpha * x must not be taken in half precision
    msg = chain_message(chain, {"w": x})
    msg.tensors["w#x"].chunks = list(
        torch.cat(msg.tensors["w#x"].chunks).split(5000)
    )  # as 1 MiB frames would
    out = expand(msg, CODECS, {"w": ((300, 70), torch.float32)})["w"]
    assert out.dtype == torch.float32 and out.shape == (300, 70)
    assert (
        all(c.dtype == narrow for c in out.chunks) and len(out.chunks) == 5
    )  # the received frames themselves
    cast = x.to(narrow).to(torch.float32)
    assert torch.equal(out.to_tensor(), cast)
    scaled, summed = torch.empty(300, 70), torch.ones(300, 70)
    out.scale_to(scaled, alpha=8.0)
    out.add_to(summed, alpha=0.5)
    assert torch.equal(scaled, cast * 8.0) and torch.isfinite(scaled).all()
    assert torch.equal(summed, 1 + cast * 0.5)
    assert out.is_finite()
    again = decode(
        encode(Message(MsgType.UPDATE, meta=msg.meta, tensors={"w": out}))
    )  # sent on as what it claims to be
    assert torch.equal(again.tensors["w"].to_tensor(), cast)


@pytest.mark.parametrize("narrow", [torch.float16, torch.bfloat16])
def test_half_precision_parts_are_checked_exactly_for_nan_and_inf(narrow: torch.dtype) -> None:
    big = WireTensor(
        torch.float32, (3000,), [torch.full((1000,), 60000.0, dtype=narrow) for _ in range(3)]
    )
    assert big.is_finite()  # its sum overflows half precision: no false alarm
    for bad in (float("nan"), float("inf"), -float("inf")):
        chunks = [torch.zeros(1000, dtype=narrow) for _ in range(3)]
        chunks[2][999] = bad
        assert not WireTensor(torch.float32, (3000,), chunks).is_finite()


def test_a_cast_part_of_another_dtype_is_decoded_and_refused() -> None:
    msg = chain_message(["fp16"], {"w": sample((10, 10), torch.float32)})
    msg.tensors["w#x"] = WireTensor.from_tensor(
        torch.full((100,), 1e300, dtype=torch.float64)
    )  # would overflow float32
    with pytest.raises(ProtocolError) as err:
        expand(msg, CODECS, {"w": ((10, 10), torch.float32)})
    assert err.value.reason == "bad_encoding" and "float64" in err.value.detail
    msg.tensors["w#x"] = WireTensor.from_tensor(
        torch.ones(99, dtype=torch.float16)
    )  # one element short
    with pytest.raises(ProtocolError) as err:
        expand(msg, CODECS, {"w": ((10, 10), torch.float32)})
    assert err.value.reason == "bad_encoding"


@pytest.mark.parametrize(
    "name", [n for n in NAMES if getattr(CODECS.get(n), "cast_from", None) is not None]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_cast_codec_encodes_into_a_given_block_what_encode_gives(
    name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``encode_into`` (how the worker and the downlink cast a block straight into
    where it is sent from) writes exactly ``encode``'s part, across its own blocks."""
    monkeypatch.setattr(codecs_module, "CLAMP_BLOCK", 1000)
    codec = make(name)
    x = sample((3000, 7), dtype) * 30000  # past fp16's range here and there
    x[0, :6] = torch.tensor([65519.0, 65520.0, -1e9, float("nan"), float("inf"), -0.0])
    expected = codec.encode(x)["x"]
    out = torch.empty(x.numel(), dtype=codec.cast_from)
    codec.encode_into(x, out)
    assert torch.equal(out.view(3000, 7).isnan(), expected.isnan())
    assert torch.equal(out.view(3000, 7).nan_to_num(), expected.nan_to_num())
    codec.encode_into(x.T, out)  # a non-contiguous input: element by element in its own order
    assert torch.equal(
        out.nan_to_num(), codec.encode(x.T.contiguous())["x"].reshape(-1).nan_to_num()
    )
    if name == "fp16":  # the same values as casting first and clamping in half precision
        reference = x.to(torch.float16).clamp_(-65504, 65504)
        assert torch.equal(expected.nan_to_num(), reference.nan_to_num()) and torch.equal(
            expected.isnan(), reference.isnan()
        )


def test_the_default_encode_into_copies_encodes_part_and_refuses_other_parts() -> None:
    class Halve(Codec):
        name = "halve"
        cast_from = torch.float16

        def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"x": (tensor / 2).half()}

        def decode(self, parts, shape, dtype):  # type: ignore[no-untyped-def]
            return parts["x"].to(dtype).reshape(shape) * 2

    out = torch.empty(12, dtype=torch.float16)
    Halve().encode_into(torch.arange(12.0).view(3, 4), out)
    assert torch.equal(out, torch.arange(12.0).half() / 2)

    class Two(Halve):
        def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"x": tensor.half(), "y": tensor.half()}

    with pytest.raises(ValueError, match="parts"):
        Two().encode_into(torch.ones(3), torch.empty(3, dtype=torch.float16))
