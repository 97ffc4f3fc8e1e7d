"""SecAgg+ by hand, both sides in one process: the coordinator learns the sum and
only the sum; dropouts after any step; bad shares named; too few shares refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from elastic_plugins.privacy.secagg import shamir
from elastic_plugins.privacy.secagg.graph import degree_for, neighbours
from elastic_plugins.privacy.secagg.protocol import ClientRound, ProtocolFailure, ServerRound
from elastic_plugins.privacy.secagg.quantise import (
    dequantise_sum,
    flat_uint32,
    levels_for,
    quantise,
)

SIZE = 50_000


def inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"c{i}": rng.integers(0, 1 << 20, SIZE, dtype=np.uint32) for i in range(n)}


def run(
    n: int,
    drop_before_shares: set[str] = frozenset(),
    drop_before_input: set[str] = frozenset(),
    drop_before_reveal: set[str] = frozenset(),
    tamper=None,
    threshold: int | None = None,
    seen: dict | None = None,
):
    values = inputs(n)
    names = sorted(values)
    degree = degree_for(n)
    server = ServerRound(b"job/1", names, degree, threshold or degree // 2 + 1, 7, SIZE)
    clients = {c: ClientRound(c, b"job/1") for c in names}
    for c, client in clients.items():
        server.add_keys(c, client.advertise())
    rosters = server.rosters()
    for c in names:
        if c not in drop_before_shares:
            server.add_shares(c, clients[c].share(rosters[c]))
    for c, inbox in server.inboxes().items():
        clients[c].receive(inbox)
    for c in server.inboxes():
        if c not in drop_before_input:
            masked = clients[c].mask(values[c].copy())
            if seen is not None:
                seen[c] = masked.copy()
            server.add_input(c, masked)
    request = server.request()
    for c in request["survivors"]:
        if c not in drop_before_reveal:
            revealed = clients[c].reveal(request)
            if tamper:
                tamper(c, revealed)
            server.add_reveal(c, revealed)
    result = server.unmask()
    expected = np.zeros(SIZE, dtype=np.uint32)
    for c in result.survivors:
        expected += values[c]
    return result, expected


def test_the_sum_comes_out_exact() -> None:
    result, expected = run(6)
    assert np.array_equal(result.total, expected) and result.dropped == []


def test_masked_inputs_look_uniform() -> None:
    """What the coordinator receives from each client: chi-square over 256 buckets of
    the top byte, against uniform in Z_(2^32), at the 0.1% level (df 255: 330.5)."""
    seen: dict = {}
    run(5, seen=seen)
    for c, masked in seen.items():
        counts = np.bincount((masked >> 24).astype(np.int64), minlength=256)
        expected = masked.size / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 330.5, (c, chi2)
    # the inputs themselves are nothing like uniform: the test can tell
    raw = inputs(5)["c0"]
    counts = np.bincount((raw >> 24).astype(np.int64), minlength=256)
    assert float(((counts - raw.size / 256) ** 2 / (raw.size / 256)).sum()) > 1e5


def test_a_client_dropping_after_its_input_is_recovered() -> None:
    result, expected = run(6, drop_before_reveal={"c2"})
    assert "c2" in result.survivors and np.array_equal(result.total, expected)


def test_clients_dropping_before_their_input_are_left_out() -> None:
    result, expected = run(8, drop_before_input={"c1", "c5"}, drop_before_shares={"c3"})
    assert result.dropped == ["c1", "c5"] and "c3" not in result.survivors
    assert np.array_equal(result.total, expected)


def test_sparse_graph_with_many_clients() -> None:
    result, expected = run(16, drop_before_input={"c4"}, drop_before_reveal={"c9"})
    assert degree_for(16) < 15 and np.array_equal(result.total, expected)
    graph = neighbours([f"c{i}" for i in range(16)], degree_for(16), 7)
    assert all(len(v) == degree_for(16) for v in graph.values())
    assert all(u in graph[v] for u in graph for v in graph[u])  # symmetric


def test_a_bad_share_is_named_and_left_out() -> None:
    def tamper(revealer: str, revealed: dict) -> None:
        if revealer == "c3" and "c0" in revealed["b"]:
            share = shamir.Share.from_bytes(revealed["b"]["c0"])
            revealed["b"]["c0"] = shamir.Share(
                share.x, ((share.values[0] + 1) % shamir.PRIME, *share.values[1:])
            ).to_bytes()

    result, expected = run(8, tamper=tamper)
    assert np.array_equal(result.total, expected)
    assert result.excluded == {"c3": "a bad share of c0's self-mask seed"}


def test_below_the_threshold_the_round_cannot_be_unmasked() -> None:
    with pytest.raises(
        ProtocolFailure, match=r"only \d shares of c\d's self-mask seed came, 5 are needed"
    ):
        run(6, drop_before_reveal={"c0", "c1", "c2"}, threshold=5)


def test_a_client_never_reveals_both_secrets_of_one_neighbour() -> None:
    client = ClientRound("c0", b"r")
    with pytest.raises(ProtocolFailure, match="each client once"):
        client.reveal({"survivors": ["c0", "c1"], "dropped": ["c1"]})
    result, _ = run(4)
    assert result.excluded == {}


def shared(size: int) -> tuple[ServerRound, dict[str, ClientRound]]:
    """Clients a, b and c through steps 1 and 2 (keys, shares) of one round."""
    names = ["a", "b", "c"]
    server = ServerRound(b"r", names, 2, 2, 0, size)
    clients = {c: ClientRound(c, b"r") for c in names}
    for c in names:
        server.add_keys(c, clients[c].advertise())
    rosters = server.rosters()
    for c in names:
        server.add_shares(c, clients[c].share(rosters[c]))
    return server, clients


def test_a_share_sealed_for_another_does_not_open() -> None:
    server, clients = shared(4)
    inbox = server.inboxes()["b"]
    inbox["shares"]["a"] = server.inboxes()["c"]["shares"]["a"]  # a's share for c, given to b
    with pytest.raises(ProtocolFailure, match="the shares from a do not open"):
        clients["b"].receive(inbox)


def test_quantised_sums_are_exact_to_one_step_per_client() -> None:
    torch.manual_seed(0)
    xs = [torch.randn(SIZE) * 0.1 for _ in range(16)]
    levels = levels_for(16)
    total = np.zeros(SIZE, dtype=np.uint64)
    for seed, x in enumerate(xs):
        total += flat_uint32(quantise(x, 1.0, levels, bytes([seed]) * 32))
    assert total.max() < 1 << 32  # no wrap
    got = dequantise_sum(total.astype(np.uint32), 16, 1.0, levels)
    step = 2.0 / levels
    assert float((got - sum(x.double() for x in xs)).abs().max()) <= 16 * step
    # unbiased: the mean error is far below a step
    assert abs(float((got - sum(x.double() for x in xs)).mean())) < step / 10


def test_masking_while_quantising_is_masking_after() -> None:
    """The worker's one pass (quantise, and every mask added to each block in cache)
    gives what quantising, then masking, gives."""
    client = ClientRound("c0", b"r")
    client.held = {"c1": (b"", b""), "c2": (b"", b"")}
    client.peers = {
        "c1": (b"", ClientRound("c1", b"r").s.public),
        "c2": (b"", ClientRound("c2", b"r").s.public),
    }
    parts = [torch.randn(70_000) * 0.1, torch.randn(3, 50_000) * 0.1]  # blocks cross tensors
    levels = levels_for(3)
    fused = flat_uint32(quantise(parts, 1.0, levels, bytes(32), client.masks()))
    flat = torch.cat([p.flatten() for p in parts])
    after = client.mask(flat_uint32(quantise(flat, 1.0, levels, bytes(32))))
    assert np.array_equal(fused, after)
    # in place: each float32 tensor's memory holds its result, as int32 of its shape
    own = [p.clone() for p in parts]
    result = quantise(own, 1.0, levels, bytes(32), client.masks(), in_place=True)
    for o, r in zip(own, result, strict=True):
        assert r.dtype == torch.int32 and r.shape == o.shape and r.data_ptr() == o.data_ptr()
    assert np.array_equal(flat_uint32(result), fused)
    # not in place: the input is left as it was
    kept = [p.clone() for p in parts]
    quantise(kept, 1.0, levels, bytes(32), client.masks())
    assert all(torch.equal(k, p) for k, p in zip(kept, parts, strict=True))


def test_an_input_comes_in_pieces_in_any_order_each_once() -> None:
    """Parts of the tensors of an input arrive in the packer's order, not the
    vector's: the server folds them wherever they go, and refuses an overlap."""
    server, _ = shared(10)
    ones = np.ones(10, dtype=np.uint32)
    server.add_input("a", ones[:4], 6)
    server.add_input("a", ones[:6], 0)
    assert "a" in server.inputs
    server.add_input("b", ones[:5], 5)
    with pytest.raises(ProtocolFailure, match="each sent once"):
        server.add_input("b", ones[:2], 4)  # overlaps the piece from 5
    with pytest.raises(ProtocolFailure, match="each sent once"):
        server.add_input("b", ones[:6], 5)  # past the end
    server.add_input("b", ones[:5], 0)
    assert server.inputs == {"a", "b"} and not server.partial
    assert server.total.tolist() == [2] * 10
