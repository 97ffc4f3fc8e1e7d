"""1 of 5 workers Byzantine: plain FedAvg breaks, the robust rules keep digits >= 0.85.

The jobs run with ``elastic.simulation`` (the real engine, rules and worker runtime),
one simulated worker sending a sign-flipped x10 change, or Gaussian noise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from elastic_plugins.robust import Krum, Median, MultiKrum, TrimmedMean

from elastic.errors import ConfigError, JobSpecError
from elastic.jobspec import parse_job_spec
from elastic.plugins import Plugins
from elastic.simulation import simulate

pytestmark = pytest.mark.slow


def run(tmp_path: Path, rule: str, params: dict, attack: str) -> float:
    spec = parse_job_spec(
        {
            "job": {
                "id": "byz",
                "task": "digits",
                "rule": rule,
                "rounds": 15,
                "min_workers": 5,
                "eval_every": 15,
            },
            "task": {"alpha": 100.0},
            "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
            "rule": params,
            "checkpoint": {"every": 100},
        }
    )
    job = simulate(spec, 5, Plugins(), tmp_path / f"{rule}-{attack}", attackers={0: attack})
    return job.history[-1]["accuracy"]


@pytest.mark.parametrize("attack, fedavg_below", [("signflip:10", 0.5), ("noise:5", 0.75)])
def test_fedavg_breaks_and_robust_rules_hold(
    tmp_path: Path, attack: str, fedavg_below: float
) -> None:
    assert run(tmp_path, "fedavg", {}, attack) < fedavg_below  # without an attacker it reaches 0.89
    for rule, params in [
        ("median", {}),
        ("trimmed_mean", {"beta": 0.2}),
        ("krum", {"f": 1}),
        ("multikrum", {"f": 1, "m": 3}),
    ]:
        accuracy = run(tmp_path, rule, params, attack)
        assert accuracy >= 0.85, (rule, attack, accuracy)


def test_the_rules_against_hand_computations() -> None:
    rows = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, -400.0], [100.0, 50.0]])
    torch.testing.assert_close(Median({}).combine(rows), torch.tensor([3.0, 20.0]))
    torch.testing.assert_close(
        TrimmedMean({"beta": 0.2}).combine(rows), torch.tensor([3.0, 20.0])
    )  # 1 of 5 cut each side
    near = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [50.0, 50.0]])
    torch.testing.assert_close(
        Krum({"f": 1}).combine(near),
        torch.tensor([0.1, 0.1]) * 0.5 + torch.tensor([0.0, 0.0]) * 0.5,
        atol=0.11,
        rtol=0,
    )
    assert float(Krum({"f": 1}).combine(near).abs().max()) <= 0.1  # never the outlier
    torch.testing.assert_close(
        MultiKrum({"f": 1, "m": 4}).combine(near), torch.tensor([0.05, 0.05])
    )


def test_bad_parameters_and_attacks() -> None:
    with pytest.raises(JobSpecError, match="beta must be in"):
        TrimmedMean({"beta": 0.5})
    with pytest.raises(JobSpecError, match="use rule multikrum to set m"):
        Krum({"m": 2})
    with pytest.raises(ConfigError, match="signflip:FACTOR or noise:STDDEV"):
        simulate(
            parse_job_spec({"job": {"task": "linreg", "rule": "fedavg"}}),
            2,
            Plugins(),
            Path("/tmp/unused"),
            attackers={0: "flip"},
        )
