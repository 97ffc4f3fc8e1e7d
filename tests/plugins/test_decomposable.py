"""Decomposable rules: a round aggregated in pieces (``partial`` over each edge's
updates, ``merge`` of the pieces at the root) makes the flat round's model, for
every rule that declares it can, over rounds (server optimizers keep their state),
with updates that came in parts and stopped halfway; the rules that need every
update say they cannot."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from elastic.plugins import Plugins
from elastic.rules import Aggregator, Update
from elastic.training import update_template
from elastic.wire.tensors import WireTensor

PLUGINS = Plugins()
DECOMPOSABLE = [
    ("fedavg", {}),
    ("fedavg", {"weighting": "uniform"}),
    ("fedavg", {"server_lr": 0.5, "server_momentum": 0.9}),
    ("fedadam", {}),
    ("fedyogi", {}),
    ("fedadagrad", {}),
    ("syncavg", {}),
]


def rule(name: str, params: dict[str, Any]) -> Aggregator:
    return PLUGINS.rule(name)(params)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def updates(r: Aggregator, m: nn.Module, n: int, seed: int) -> list[Update]:
    """``n`` updates for rule ``r`` against model ``m``: trained weights near it, or
    gradients; sample counts that differ."""
    generator = torch.Generator().manual_seed(seed)
    kind = "gradient" if r.worker_mode == "gradient" else "weights"
    out = []
    for i in range(n):
        tensors = {
            k: WireTensor.from_tensor(
                (v.detach() if kind == "weights" else torch.zeros_like(v))
                + torch.randn(v.shape, generator=generator) * 0.1
            )
            for k, v in update_template(m, r.worker_mode).items()
        }
        out.append(Update(f"w{i}", 0, 5 + 7 * i, 0.1, kind, tensors))
    return out


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name, params", DECOMPOSABLE)
def test_two_levels_make_the_flat_rounds_model(name: str, params: dict[str, Any]) -> None:
    flat, tree = rule(name, params), rule(name, params)
    assert flat.decomposable
    flat_model, tree_model = model(), model()
    flat.setup(flat_model)
    tree.setup(tree_model)
    edges = [rule(name, params) for _ in range(2)]
    for edge in edges:
        edge.setup(copy.deepcopy(tree_model))  # (an edge never steps its model)
    for number in range(3):
        round_updates = updates(flat, flat_model, 5, seed=number)
        flat.begin_round()
        for u in round_updates:
            flat.accumulate(u)
        flat.finalize()

        tree.begin_round()
        for edge, share in zip(edges, (round_updates[:2], round_updates[2:]), strict=True):
            edge.begin_round()
            for u in share:
                edge.accumulate(u)
            tree.merge(edge.partial())
        tree.finalize()
        for k, v in state(flat_model).items():
            assert torch.allclose(state(tree_model)[k], v, atol=1e-6), (name, number, k)


def test_parts_that_stopped_halfway_merge_as_they_fold() -> None:
    """Edge A holds an update whole and one that stopped after the first 20
    elements of a tensor; edge B one that stopped after 7 (another cut: the pieces
    overlap). Each element is the mean of the updates that reached it, as flat."""
    flat, tree, a, b = (rule("fedavg", {}) for _ in range(4))
    flat_model, tree_model = model(), model()
    for r, m in ((flat, flat_model), (tree, tree_model), (a, model()), (b, model())):
        r.setup(m)
        r.begin_round()
    whole, first, second = updates(flat, flat_model, 3, seed=7)
    name = "0.weight"  # 6 x 8: 48 elements

    def part(u: Update, stop: int) -> tuple[Update, list[tuple[str, int, int]]]:
        piece = WireTensor.from_tensor(u.tensors[name].to_tensor().reshape(-1)[:stop].clone())
        return Update(u.worker, 0, u.num_samples, 0.1, "weights", {name: piece}), [(name, 0, stop)]

    for target in (flat, a):
        target.accumulate(whole)
        target.accumulate_part(*part(first, 20))
    for target in (flat, b):
        target.accumulate_part(*part(second, 7))
    tree.merge(a.partial())
    tree.merge(b.partial())
    flat.finalize()
    tree.finalize()
    got, want = state(tree_model), state(flat_model)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    w = [u.num_samples for u in (whole, first, second)]
    t = [u.tensors[name].to_tensor().reshape(-1) for u in (whole, first, second)]
    mean = got[name].reshape(-1)
    assert torch.allclose(mean[:7], (w[0] * t[0] + w[1] * t[1] + w[2] * t[2])[:7] / sum(w))
    assert torch.allclose(mean[7:20], (w[0] * t[0] + w[1] * t[1])[7:20] / (w[0] + w[1]))
    assert torch.allclose(mean[20:], t[0][20:])


def test_an_edge_with_nothing_merges_as_nothing() -> None:
    edge, root = rule("fedavg", {}), rule("fedavg", {})
    edge.setup(model())
    root_model = model()
    root.setup(root_model)
    edge.begin_round()
    root.begin_round()
    empty = edge.partial()
    assert not empty.tensors and not empty.weights
    root.merge(empty)
    only = updates(root, root_model, 1, seed=3)[0]
    root.accumulate(only)
    root.finalize()
    for k, v in state(root_model).items():
        assert torch.allclose(v, only.tensors[k].to_tensor().reshape(v.shape))


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multikrum"])
def test_rules_that_need_every_update_say_they_cannot(name: str) -> None:
    r = rule(name, {})
    assert not r.decomposable
    with pytest.raises(NotImplementedError, match="cannot be computed in pieces"):
        r.partial()
