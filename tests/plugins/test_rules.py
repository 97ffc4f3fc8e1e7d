"""Aggregation rules against hand computations, plus one conformance suite for every rule."""

from __future__ import annotations

import pytest
import torch
from elastic_plugins.averaging import WeightedSum, weighted_mean
from elastic_plugins.fedavg import FedAvg
from elastic_plugins.syncavg import SyncAvg
from torch import nn

from elastic.api import Update
from elastic.errors import JobSpecError
from elastic.plugins import Plugins
from elastic.training import move_to_fresh_memory, update_kind, update_template
from elastic.wire.tensors import WireTensor


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def make_update(tensors: dict[str, torch.Tensor], n: int, kind: str = "weights") -> Update:
    return Update("w", 0, n, 0.1, kind, {k: WireTensor.from_tensor(v) for k, v in tensors.items()})


def test_weighted_mean_by_hand() -> None:
    got = weighted_mean([torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0])], [1, 2])
    assert torch.allclose(got, torch.tensor([3.0, 6.0]))
    ws = WeightedSum({"x": torch.zeros(2)})
    ws.add({"x": torch.tensor([1.0, 2.0])}, 1)
    ws.add({"x": WireTensor.from_tensor(torch.tensor([4.0, 8.0]))}, 2)
    assert torch.allclose(ws.mean()["x"], got)


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("narrow", [torch.float32, torch.float16])
def test_a_first_update_in_shared_memory_is_folded_with_the_second_bit_for_bit(
    count: int, narrow: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held, then folded with the next one a block at a time: the same sums as folding
    each as it comes, whatever the chunks (one for shared memory, frames for TCP)."""
    import elastic_plugins.averaging as averaging

    monkeypatch.setattr(averaging, "FOLD_BLOCK", 700)  # blocks that cut across chunks
    torch.manual_seed(1)
    values = [torch.randn(3000).to(narrow) for _ in range(count)]
    weights = [3.0, 0.7, 11.0][:count]

    def wire(t: torch.Tensor, i: int, shared: bool) -> WireTensor:
        chunks = (
            [t] if i == 0 else list(t.split(512))
        )  # the first from a segment, the rest as frames
        return WireTensor(torch.float32, (3000,), chunks, shared=shared and i == 0)

    sums = {}
    for shared in (False, True):
        ws = WeightedSum({"x": torch.zeros(3000)})
        for i, (t, w) in enumerate(zip(values, weights, strict=True)):
            ws.add({"x": wire(t, i, shared)}, w)
            assert (ws._held is not None) is (shared and i == 0)
        sums[shared] = ws.mean()["x"].clone()
    assert torch.equal(sums[True], sums[False])
    assert torch.allclose(
        sums[True], weighted_mean([t.float() for t in values], weights), atol=1e-5
    )


@pytest.mark.parametrize(
    "params", [{}, {"server_lr": 1.0, "server_momentum": 0.0}, {"weighting": "samples"}]
)
def test_fedavg_is_sample_weighted_mean_of_weights(params: dict) -> None:
    m = model()
    before = {k: v.detach().clone() for k, v in update_template(m, "train").items()}
    agg = FedAvg(params)
    agg.setup(m)
    agg.begin_round()
    w1 = {k: v + 1.0 for k, v in before.items()}  # trained weights: the model plus a delta
    w2 = {k: v + 4.0 for k, v in before.items()}
    agg.accumulate(make_update(w1, 10))
    agg.accumulate(make_update(w2, 30))
    agg.finalize()
    for k, v in update_template(m, "train").items():
        assert torch.allclose(v, before[k] + 3.25)  # (10*1 + 30*4) / 40
    assert m.state_dict()["1.num_batches_tracked"].dtype == torch.int64  # untouched


def test_fedavg_server_lr_and_momentum() -> None:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    agg = FedAvg({"server_lr": 0.5, "server_momentum": 0.9})
    agg.setup(m)
    for _ in range(2):
        agg.begin_round()
        agg.accumulate(make_update({"weight": m.weight.detach() + 1.0}, 1))  # delta 1
        agg.finalize()
    # v1 = 1, w = 0.5; v2 = 0.9 + 1 = 1.9, w = 0.5 + 0.95
    assert m.weight.item() == pytest.approx(1.45)
    restored = FedAvg({"server_lr": 0.5, "server_momentum": 0.9})
    restored.setup(m)
    restored.load_state_dict(agg.state_dict())
    assert torch.equal(
        restored.state_dict()["velocity"]["weight"], agg.state_dict()["velocity"]["weight"]
    )


def test_syncavg_steps_the_optimizer_on_the_weighted_mean_gradient() -> None:
    m = nn.Linear(2, 1)
    w0 = m.weight.detach().clone()
    agg = SyncAvg({"lr": 0.5})
    agg.setup(m)
    agg.begin_round()
    agg.accumulate(
        make_update(
            {"weight": torch.tensor([[1.0, 0.0]]), "bias": torch.tensor([1.0])}, 1, "gradient"
        )
    )
    agg.accumulate(
        make_update(
            {"weight": torch.tensor([[0.0, 3.0]]), "bias": torch.tensor([0.0])}, 3, "gradient"
        )
    )
    agg.finalize()
    assert torch.allclose(m.weight.detach(), w0 - 0.5 * torch.tensor([[0.25, 2.25]]))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"server_lr": -1.0}, "server_lr must be > 0"),
        ({"server_momentum": 1.0}, "server_momentum"),
        ({"servr_lr": 1.0}, "unknown parameter 'servr_lr'"),
        ({"weighting": 3}, "weighting' must be str"),
    ],
)
def test_fedavg_bad_params(params: dict, match: str) -> None:
    with pytest.raises(JobSpecError, match=match):
        FedAvg(params)


def neutral_update(m: nn.Module, mode: str) -> Update:
    template = update_template(m, mode)
    if mode in ("train", "collective"):  # trained weights, or a collective's checkpoint
        return make_update({k: v.detach().clone() for k, v in template.items()}, 5)
    return make_update(
        {k: torch.zeros_like(v) for k, v in template.items()}, 5, update_kind(mode)
    )  # a zero gradient or delta


@pytest.mark.parametrize("name", Plugins().aggregators.names())
class TestAggregatorConformance:
    """Every installed rule: the aggregate of one zero update changes nothing it should not."""

    def test_neutral_update_keeps_the_model(self, name: str) -> None:
        """Trained weights equal to the model (or a zero gradient) change nothing
        beyond float32 rounding of the average."""
        cls = Plugins().aggregators.get(name)
        m = model()
        agg = cls({})
        agg.setup(m)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        agg.begin_round()
        agg.accumulate(neutral_update(m, cls.worker_mode))
        agg.finalize()
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-7, msg=k)

    def test_finalize_reaches_a_model_moved_to_fresh_memory(self, name: str) -> None:
        """The engine moves the model's tensors while a send still reads them; the
        rule must write the model's current memory, not views it kept."""
        cls = Plugins().aggregators.get(name)
        m = model()
        agg = cls({})
        agg.setup(m)
        for _ in range(2):
            move_to_fresh_memory(m)
            before = {k: v.clone() for k, v in update_template(m, cls.worker_mode).items()}
            agg.begin_round()
            shifted = {
                k: (v + 1.0 if cls.worker_mode in ("train", "collective") else torch.ones_like(v))
                for k, v in before.items()
            }
            agg.accumulate(make_update(shifted, 5, update_kind(cls.worker_mode)))
            agg.finalize()
            after = update_template(m, cls.worker_mode)
            assert any(not torch.equal(after[k], before[k]) for k in before), (
                "finalize left the model unchanged"
            )

    def test_state_round_trips(self, name: str) -> None:
        cls = Plugins().aggregators.get(name)
        m = model()
        agg = cls({})
        agg.setup(m)
        template = update_template(m, cls.worker_mode)
        agg.begin_round()
        agg.accumulate(
            make_update(
                {k: torch.ones_like(v) for k, v in template.items()},
                5,
                update_kind(cls.worker_mode),
            )
        )
        agg.finalize()
        other = cls({})
        other.setup(model())
        other.load_state_dict(agg.state_dict())


def parts_of(
    t: torch.Tensor, cuts: list[int]
) -> list[tuple[list[tuple[str, int, int]], dict[str, WireTensor]]]:
    """``t`` (tensor "x") cut at ``cuts``: each part's segments and tensors, as sent."""
    bounds = [0, *cuts, t.numel()]
    return [
        ([("x", a, b)], {"x": WireTensor.from_tensor(t[a:b])})
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]


def test_updates_folded_in_parts_sum_bit_for_bit_as_whole_ones() -> None:
    torch.manual_seed(2)
    values, weights = [torch.randn(1000) for _ in range(3)], [3.0, 0.7, 11.0]
    whole, parted = WeightedSum({"x": torch.zeros(1000)}), WeightedSum({"x": torch.zeros(1000)})
    for t, w in zip(values, weights, strict=True):
        whole.add({"x": WireTensor.from_tensor(t)}, w)
        for segments, tensors in parts_of(t, [300, 600]):
            parted.add_part(segments, tensors, w)
    assert parted.weights() == {"x": [(0, 300, 14.7), (300, 600, 14.7), (600, 1000, 14.7)]}
    assert torch.equal(parted.mean()["x"], whole.mean()["x"])


def test_an_update_that_stopped_halfway_weighs_only_where_it_came() -> None:
    """Worker b sent its first part only: there the mean is of a and b, beyond it of a."""
    a, b = torch.full((10,), 1.0), torch.full((10,), 4.0)
    ws = WeightedSum({"x": torch.zeros(10)})
    for segments, tensors in parts_of(a, [4]):
        ws.add_part(segments, tensors, 1.0)
    segments, tensors = parts_of(b, [4])[0]
    ws.add_part(segments, tensors, 3.0)
    ws.add(
        {"x": WireTensor.from_tensor(torch.full((10,), 2.0))}, 1.0
    )  # a whole one too: everywhere
    assert ws.weights() == {"x": [(0, 4, 5.0), (4, 10, 2.0)]}
    assert torch.equal(ws.mean()["x"], torch.tensor([15 / 5] * 4 + [3 / 2] * 6))


def test_fedavg_keeps_the_weights_no_update_reached() -> None:
    m = nn.Linear(4, 1, bias=False)
    with torch.no_grad():  # small integers: the weighted mean of one update is exact
        m.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 5.0]]))
    before = m.weight.detach().clone()
    agg = FedAvg({})
    agg.setup(m)
    agg.begin_round()
    trained = before.reshape(-1) + 2.0
    segments, tensors = parts_of(trained, [2])[0]  # a worker that sent half, then left
    agg.accumulate_part(
        Update("w", 0, 10, 0.1, "weights", {"weight": tensors["x"]}), [("weight", *segments[0][1:])]
    )
    agg.finalize()
    assert torch.equal(
        m.weight.detach().reshape(-1), torch.cat([trained[:2], before.reshape(-1)[2:]])
    )


def test_fedavg_with_momentum_steps_only_where_updates_came() -> None:
    m = nn.Linear(4, 1, bias=False)
    before = m.weight.detach().clone().reshape(-1)
    agg = FedAvg({"server_momentum": 0.5, "server_lr": 1.0})
    agg.setup(m)
    agg.begin_round()
    agg.accumulate_part(
        Update("w", 0, 10, 0.1, "weights", {"weight": WireTensor.from_tensor(before[2:] + 1.0)}),
        [("weight", 2, 4)],
    )
    agg.finalize()
    assert torch.allclose(m.weight.detach().reshape(-1), torch.cat([before[:2], before[2:] + 1.0]))


def test_syncavg_averages_gradients_that_came_in_parts() -> None:
    m = nn.Linear(4, 1, bias=False)
    before = m.weight.detach().clone().reshape(-1)
    agg = SyncAvg({"lr": 1.0})
    agg.setup(m)
    agg.begin_round()
    for grad, n in ((torch.ones(4), 1), (torch.full((4,), 3.0), 3)):
        for segments, tensors in parts_of(grad, [1]):
            agg.accumulate_part(
                Update("w", 0, n, 0.1, "gradient", {"weight": tensors["x"]}),
                [("weight", *segments[0][1:])],
            )
    agg.finalize()
    assert torch.allclose(m.weight.detach().reshape(-1), before - 2.5)
