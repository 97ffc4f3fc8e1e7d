"""The ``async`` rule and its staleness functions against hand computations."""

from __future__ import annotations

import pytest
import torch
from elastic_plugins.asyncbuffered import AsyncBuffered
from elastic_plugins.staleness import staleness_function
from torch import nn

from elastic.api import Update
from elastic.errors import JobSpecError
from elastic.wire.tensors import WireTensor


def delta(value: float, n: int, staleness: int = 0) -> Update:
    return Update(
        "w",
        0,
        n,
        0.1,
        "delta",
        {
            "weight": WireTensor.from_tensor(torch.full((1, 2), value)),
            "bias": WireTensor.from_tensor(torch.full((1,), value)),
        },
        staleness,
    )


def test_staleness_functions() -> None:
    assert staleness_function("constant")(7) == 1.0
    poly = staleness_function("polynomial", a=0.5)
    assert poly(0) == 1.0 and poly(3) == pytest.approx(0.5)
    hinge = staleness_function("hinge", a=10.0, b=4)
    assert [hinge(t) for t in (0, 4)] == [1.0, 1.0] and hinge(5) == pytest.approx(1 / 11)
    for kind in ("constant", "polynomial", "hinge"):  # never grows with staleness
        s = staleness_function(kind)
        assert all(s(t + 1) <= s(t) for t in range(20))


def test_fedasync_with_fresh_update_mixes_the_weights() -> None:
    m = nn.Linear(2, 1)
    w0 = m.weight.detach().clone()
    rule = AsyncBuffered({"mixing": 0.6})
    rule.setup(m)
    rule.begin_round()
    rule.accumulate(delta(1.0, 10))  # the worker's weights: w0 + 1
    assert rule.ready()
    rule.finalize()
    torch.testing.assert_close(m.weight.detach(), 0.4 * w0 + 0.6 * (w0 + 1.0))


def test_fedbuff_weights_by_samples_and_staleness() -> None:
    m = nn.Linear(2, 1)
    w0 = m.weight.detach().clone()
    rule = AsyncBuffered({"buffer": 2, "staleness": "polynomial", "staleness_a": 1.0})
    rule.setup(m)
    rule.begin_round()
    rule.accumulate(delta(2.0, 30, staleness=0))
    assert not rule.ready()
    rule.accumulate(delta(4.0, 10, staleness=1))  # counts half: s(1) = 1/2
    assert rule.ready()
    rule.finalize()
    want = w0 + (30 * 1.0 * 2.0 + 10 * 0.5 * 4.0) / 40
    torch.testing.assert_close(m.weight.detach(), want)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"buffer": 0}, "buffer must be >= 1"),
        ({"mixing": 1.5}, "mixing must be in"),
        ({"max_staleness": -1}, "max_staleness must be >= 0"),
        ({"staleness": "linear"}, "staleness must be one of constant, polynomial, hinge"),
        ({"staleness_a": -2.0}, "staleness_a must be >= 0"),
        ({"bufer": 3}, "unknown parameter 'bufer'"),
    ],
)
def test_bad_params(params: dict, match: str) -> None:
    with pytest.raises(JobSpecError, match=match):
        AsyncBuffered(params)
