"""The compressed downlink: the coordinator's reference and a worker's stay the same."""

from __future__ import annotations

import pytest
import torch

from elastic.coordinator.downlink import Downlink
from elastic.plugins import Plugins
from elastic.wire.compression import expand
from elastic.wire.frames import decode, encode
from elastic.wire.messages import Message, MsgType

CODECS = Plugins().codecs


def follow(chain: list[str], fused: bool, rounds: int = 4) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(coordinator's reference, a worker's) after ``rounds`` model steps sent down as deltas."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1100, 1000)  # 1.1M weights: one whole block and a short one
    downlink = Downlink(model, chain, CODECS)
    if not fused:
        downlink.cast = None  # the chain's way: diff, compress, expand, add
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
        msg = decode(encode(Message(MsgType.WORK, meta={"mode": "train", "task": "t", "task_params": {}, "train": {}, "shard": [0, 1], "seed": 0}, tensors=tensors, encodings=encodings)))
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
        assert torch.equal(fused_worker[name], fused[name]), name  # the worker holds what the coordinator thinks
        assert torch.equal(plain_worker[name], plain[name]), name


def test_only_a_single_cast_is_made_a_block_at_a_time() -> None:
    model = torch.nn.Linear(3, 2)
    assert Downlink(model, ["fp16"], CODECS).cast == "fp16"
    assert Downlink(model, ["fp16", "zstd"], CODECS).cast is None
    assert Downlink(model, ["qsgd:4"], CODECS).cast is None
    half = Downlink(model.half(), ["fp16"], CODECS)  # nothing to cast: the chain's way sends it as it is
    half.advance(model, 0)
    with torch.no_grad():
        model.weight.add_(1)
    half.advance(model, 1)
    assert half.reference is not None and torch.equal(half.reference["weight"], model.weight.detach())
