"""FedAdam, FedYogi, FedAdagrad against the update equations of Reddi et al. 2021,
and FedProx's proximal term in the worker's training loop."""

from __future__ import annotations

import pytest
import torch
from elastic_plugins.fedopt import FedAdagrad, FedAdam, FedYogi
from elastic_plugins.tasks.linreg import LinReg
from torch import nn

from elastic.api import Shard, Update
from elastic.errors import JobSpecError
from elastic.jobspec import TrainParams
from elastic.training import local_train
from elastic.wire.tensors import WireTensor


def trained(m: nn.Module, shift: float, n: int) -> Update:
    return Update(
        "w",
        0,
        n,
        0.1,
        "weights",
        {k: WireTensor.from_tensor(v.detach() + shift) for k, v in m.state_dict().items()},
    )


def reference(
    variant: str, deltas: list[float], lr: float, b1: float, b2: float, tau: float
) -> float:
    """The paper's recursion for one scalar coordinate, starting at w = 0."""
    w, m, v = 0.0, 0.0, tau**2
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if variant == "fedadagrad":
            v = v + d * d
        elif variant == "fedyogi":
            v = v - (1 - b2) * d * d * (1 if v - d * d > 0 else -1 if v - d * d < 0 else 0)
        else:
            v = b2 * v + (1 - b2) * d * d
        w = w + lr * m / (v**0.5 + tau)
    return w


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_matches_the_paper_over_rounds(cls: type) -> None:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.zero_()
    rule = cls({"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.01})
    rule.setup(m)
    shifts = [(0.5, 1.5), (-0.2, 0.2), (1.0, 1.0)]  # two workers per round, 10 and 30 samples
    deltas = []
    for a, b in shifts:
        rule.begin_round()
        rule.accumulate(trained(m, a, 10))
        rule.accumulate(trained(m, b, 30))
        rule.finalize()
        deltas.append((10 * a + 30 * b) / 40)
    assert m.weight.item() == pytest.approx(
        reference(cls.name, deltas, 0.1, 0.9, 0.99, 0.01), rel=1e-5
    )


def test_moments_survive_a_checkpoint() -> None:
    m, copy = nn.Linear(2, 1), nn.Linear(2, 1)
    copy.load_state_dict(m.state_dict())
    first, second = FedAdam({}), FedAdam({})
    first.setup(m)
    second.setup(copy)
    for rule, model in ((first, m), (second, copy)):
        rule.begin_round()
        rule.accumulate(trained(model, 0.3, 5))
        rule.finalize()
    second.load_state_dict(first.state_dict())
    for rule, model in ((first, m), (second, copy)):
        rule.begin_round()
        rule.accumulate(trained(model, -0.1, 5))
        rule.finalize()
    torch.testing.assert_close(m.state_dict(), copy.state_dict())


@pytest.mark.parametrize(
    "params, match",
    [
        ({"server_lr": 0.0}, "server_lr must be > 0"),
        ({"beta1": 1.0}, "beta1 must be in"),
        ({"tau": -1.0}, "tau must be > 0"),
        ({"weighting": "votes"}, "weighting must be"),
        ({"momentum": 0.9}, "unknown parameter 'momentum'"),
    ],
)
def test_bad_params(params: dict, match: str) -> None:
    with pytest.raises(JobSpecError, match=match):
        FedAdam(params)


def test_fedprox_pulls_toward_the_received_weights() -> None:
    """One full-batch SGD step: the proximal gradient μ(w − w0) is zero at the start,
    so the first step equals plain SGD; over more steps it keeps w closer to w0."""
    task = LinReg({"samples": 40, "features": 3})
    data = task.train_dataset(Shard(0, 1, 0), None)

    def train(mu: float, epochs: int) -> tuple[torch.Tensor, torch.Tensor]:
        model = task.build_model(0)
        start = model.weight.detach().clone()
        local_train(
            task,
            model,
            data,
            TrainParams(local_epochs=epochs, batch_size=0, lr=0.1, prox_mu=mu),
            0,
            torch.device("cpu"),
        )
        return start, model.weight.detach()

    start, plain = train(0.0, 1)
    torch.testing.assert_close(train(1.0, 1)[1], plain)  # nothing to pull back yet
    far = (train(0.0, 20)[1] - start).norm()
    near = (train(1.0, 20)[1] - start).norm()
    assert near < 0.9 * far
