"""The compressed downlink: the coordinator's reference and a worker's stay the same."""

from __future__ import annotations

import os

import pytest
import torch

from elastic.compression.chain import CodecChain, expand
from elastic.coordinator.downlink import Downlink
from elastic.plugins import Plugins
from elastic.wire import shm
from elastic.wire.frames import decode, encode
from elastic.wire.header import Message, MsgType
from elastic.wire.shared import SharedReader

CODECS = Plugins().codecs


def follow(
    chain: list[str], fused: bool, rounds: int = 4
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(coordinator's reference, a worker's) after ``rounds`` model steps sent down as deltas."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1100, 1000)  # 1.1M weights: one whole block and a short one
    downlink = Downlink(model, CodecChain(CODECS, chain))
    if not fused:
        downlink.cast = False  # the chain's way: diff, compress, expand, add
    downlink.advance(model, 0)
    whole, _, _ = downlink.work("w", model.state_dict())
    held = {k: wt.to_tensor().clone() for k, wt in whole.items()}
    for version in range(1, rounds + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
            if version == 2:
                model.weight[0, 0] += 1e6  # beyond fp16: clamped, the rest comes in later deltas
        downlink.advance(model, version)
        tensors, encodings, meta = downlink.work("w", model.state_dict())
        assert meta["delta_from"] == version - 1
        msg = decode(
            encode(
                Message(
                    MsgType.WORK,
                    meta={
                        "mode": "train",
                        "task": "t",
                        "task_params": {},
                        "train": {},
                        "shard": [0, 1],
                        "seed": 0,
                    },
                    tensors=tensors,
                    encodings=encodings,
                )
            )
        )
        for name, wt in expand(msg, CODECS, downlink.template).items():
            wt.add_to(held[name])
    assert downlink.reference is not None
    return downlink.reference, held


@pytest.mark.parametrize("chain", [["fp16"], ["bf16"]])
def test_a_cast_delta_made_a_block_at_a_time_is_the_chains_own(chain: list[str]) -> None:
    fused, fused_worker = follow(chain, fused=True)
    plain, plain_worker = follow(chain, fused=False)
    for name in plain:
        assert torch.equal(fused[name], plain[name]), name
        assert torch.equal(fused_worker[name], fused[name]), (
            name
        )  # the worker holds what the coordinator thinks
        assert torch.equal(plain_worker[name], plain[name]), name


def test_only_a_single_cast_is_made_a_block_at_a_time() -> None:
    model = torch.nn.Linear(3, 2)
    assert Downlink(model, CodecChain(CODECS, ["fp16"])).cast
    assert not Downlink(model, CodecChain(CODECS, ["fp16", "zstd"])).cast
    assert not Downlink(model, CodecChain(CODECS, ["qsgd:4"])).cast
    half = Downlink(
        model.half(), CodecChain(CODECS, ["fp16"])
    )  # nothing to cast: the chain's way sends it as it is
    half.advance(model, 0)
    with torch.no_grad():
        model.weight.add_(1)
    half.advance(model, 1)
    assert half.reference is not None and torch.equal(
        half.reference["weight"], model.weight.detach()
    )


def test_workers_on_this_host_read_the_reference_where_it_lies_and_hold_what_deltas_give() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(1100, 1000)
    downlink = Downlink(model, CodecChain(CODECS, ["fp16"]), share=True)
    downlink.advance(model, 0)
    assert downlink.shared is not None and downlink.reference_is_shared
    whole, _, _ = downlink.work("remote", model.state_dict())
    assert all(
        whole[k].chunks[0].data_ptr() != t.data_ptr() for k, t in downlink.shared.tensors.items()
    )  # a copy goes on the socket
    remote = {k: wt.to_tensor().clone() for k, wt in whole.items()}
    reader, local = SharedReader(), {k: torch.empty_like(v) for k, v in remote.items()}
    try:
        for version in range(1, 4):
            with torch.no_grad():
                model.weight.add_(torch.randn_like(model.weight) * 0.01)
            downlink.advance(model, version)
            tensors, encodings, meta = downlink.work("local", model.state_dict(), local=True)
            assert (
                tensors == {} and encodings == {} and set(meta) == {"downlink", "shared"}
            )  # nothing on the socket
            assert reader.copy_into(meta["shared"], local, version) is None
            tensors, encodings, meta = downlink.work("remote", model.state_dict())
            assert meta["delta_from"] == version - 1
            for name, wt in expand(
                Message(MsgType.WORK, tensors=tensors, encodings=encodings),
                CODECS,
                downlink.template,
            ).items():
                wt.add_to(remote[name])
            for name in remote:  # the same bits either way
                assert torch.equal(local[name], remote[name]) and torch.equal(
                    local[name], downlink.reference[name]
                ), name  # type: ignore[index]
        downlink.forget(
            "local", unreadable=True
        )  # it could not open the segment: deltas from now on
        assert "shared" not in downlink.work("local", model.state_dict(), local=True)[2]
        downlink.left("local")
        assert "local" not in downlink.wire_only
    finally:
        downlink.close()
    assert not os.path.exists(os.path.join(shm.SHM_DIR, downlink.shared.name))


def test_a_small_model_or_no_room_keeps_the_reference_private(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small = Downlink(torch.nn.Linear(30, 20), CodecChain(CODECS, ["fp16"]), share=True)
    small.advance(torch.nn.Linear(30, 20), 0)
    assert small.shared is None  # under SHM_MIN_BYTES: deltas on the socket cost less

    def no_room(size: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("elastic.wire.shared.create_segment", no_room)
    model = torch.nn.Linear(1100, 1000)
    full = Downlink(model, CodecChain(CODECS, ["fp16"]), share=True)
    full.advance(model, 0)
    assert (
        full.shared is None
        and "shared" not in full.work("local", model.state_dict(), local=True)[2]
    )


def test_with_every_member_on_the_shared_reference_no_delta_is_kept_and_it_steps_the_same() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(1100, 1000)
    kept, bare = (
        Downlink(model, CodecChain(CODECS, ["fp16"]), share=True),
        Downlink(model, CodecChain(CODECS, ["fp16"]), share=True),
    )
    try:
        for version in range(3):
            with torch.no_grad():
                model.weight.add_(torch.randn_like(model.weight) * 0.01)
            kept.advance(model, version)
            bare.advance(model, version, wire=False)
            assert kept.reference is not None and bare.reference is not None
            assert all(torch.equal(kept.reference[k], bare.reference[k]) for k in kept.reference)
            assert "shared" in bare.work("local", model.state_dict(), local=True)[2]
        tensors, _, meta = bare.work("remote", model.state_dict())  # joins now: no delta was kept
        assert "delta_from" not in meta and torch.equal(
            tensors["weight"].to_tensor(), bare.reference["weight"]
        )
    finally:
        kept.close()
        bare.close()


def test_with_no_chain_an_exact_shared_copy_serves_only_workers_on_this_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(1100, 1000)
    exact = Downlink(model, CodecChain(CODECS, []), share=True)
    assert exact.exact and not exact.serves("local", True)  # nothing made before a round needs it
    try:
        for version in range(3):
            with torch.no_grad():
                model.weight.add_(torch.randn_like(model.weight))
            exact.advance(model, version)
            assert exact.reference is not None and exact.reference_is_shared
            assert all(
                torch.equal(exact.reference[k], v.detach()) for k, v in model.named_parameters()
            )  # exact, not rounded
            assert exact.serves("local", True) and not exact.serves("remote", False)
            tensors, encodings, meta = exact.work("local", model.state_dict(), local=True)
            assert tensors == {} and encodings == {} and "shared" in meta
        exact.forget("local", unreadable=True)
        assert not exact.serves("local", True)  # it gets the model like any other
    finally:
        exact.close()

    def no_room(size: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("elastic.wire.shared.create_segment", no_room)
    full = Downlink(model, CodecChain(CODECS, []), share=True)
    full.advance(model, 0)
    full.advance(model, 1)
    assert (
        full.reference is None and not full.share and not full.serves("local", True)
    )  # no private copy kept
