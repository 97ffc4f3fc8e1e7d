"""Differential privacy through the real engine and worker runtime (``simulate``):
the ε the status reports is what ``dp-accounting`` computes for the same
parameters, written here from its own API; ``max_epsilon`` ends the job before the
round that would pass it; clipping on the worker means the coordinator never sees
a bigger update."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from elastic.hookspecs import hookimpl
from elastic.jobspec import parse_job_spec
from elastic.plugins import Plugins
from elastic.simulation import simulate

pytestmark = pytest.mark.slow

DELTA = 1e-4


def job(privacy: dict[str, Any], **over: Any) -> dict[str, Any]:
    return {
        "job": {
            "id": "dp",
            "task": "linreg",
            "rule": "fedavg",
            "rounds": 12,
            "min_workers": 1,
            "clients": 50,
            "clients_per_round": 10,
            "client_sampling": "poisson",
            "eval_every": 4,
            **over,
        },
        "task": {"samples": 1000},
        "train": {"batch_size": 10, "lr": 0.05},
        "privacy": {"clip": 0.5, "noise_multiplier": 1.3, "delta": DELTA, **privacy},
    }


def epsilon(rounds: int, z: float, q: float, accountant: str = "rdp") -> float:
    """dp-accounting on its own: ``rounds`` Poisson-sampled Gaussian releases."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    acc = pld.PLDAccountant() if accountant == "pld" else rdp.RdpAccountant()
    return float(acc.compose(event).get_epsilon(DELTA))


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_the_status_epsilon_is_dp_accounting_s(tmp_path: Path, accountant: str) -> None:
    ran = simulate(parse_job_spec(job({"accountant": accountant})), 2, Plugins(), tmp_path)
    assert str(ran.state) == "finished"
    status = json.loads((tmp_path / "dp" / "status.json").read_text())
    spent = [h["epsilon"] for h in status["history"]]
    assert len(spent) == 12
    for r, got in enumerate(spent, start=1):
        assert got == pytest.approx(epsilon(r, 1.3, 10 / 50, accountant), rel=1e-5)
    last = status["history"][-1]
    assert last["dp_delta"] == DELTA and last["noise_multiplier"] == 1.3
    assert last["clip_norm"] == 0.5


def test_max_epsilon_ends_the_job_before_the_round_that_would_pass_it(tmp_path: Path) -> None:
    limit = (epsilon(7, 1.3, 0.2) + epsilon(8, 1.3, 0.2)) / 2  # round 8 would pass it
    ran = simulate(parse_job_spec(job({"max_epsilon": limit}, rounds=30)), 2, Plugins(), tmp_path)
    assert str(ran.state) == "budget_spent" and ran.round == 7
    assert ran.history[-1]["epsilon"] <= limit
    assert "one more round would make ε" in ran.final_metrics["stopped"]
    assert "eval_loss" in ran.history[-1]  # the final model was scored
    assert (tmp_path / "dp" / "final.safetensors").exists()
    # resumed, it stays spent: the accountant's rounds are in the checkpoint
    again = simulate(parse_job_spec(job({"max_epsilon": limit}, rounds=30)), 2, Plugins(), tmp_path)
    assert str(again.state) == "budget_spent" and again.round == 7


class Norms:
    """Records the L2 norm of every update the coordinator lets through."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    @hookimpl
    def elastic_validate_update(self, update: Any) -> None:
        total = sum(float(t.to_tensor().double().pow(2).sum()) for t in update.tensors.values())
        self.norms.append(total**0.5)


def test_clipped_on_the_worker_the_coordinator_never_sees_more(tmp_path: Path) -> None:
    """An asynchronous rule: its updates are deltas, whose norm is what was clipped."""
    norms = Norms()
    data = job({"clip_on": "worker", "clip": 0.05, "delta": 1e-3}, rule="async", rounds=20)
    for key in ("clients", "clients_per_round", "client_sampling"):
        del data["job"][key]
    data["job"]["min_workers"] = 3
    data["rule"] = {"buffer": 3}
    ran = simulate(parse_job_spec(data), 3, Plugins(extra=[norms]), tmp_path)
    assert str(ran.state) == "finished" and len(norms.norms) >= 60
    assert max(norms.norms) <= 0.05 * (1 + 1e-5)
    assert min(norms.norms) > 0.04  # (the clip was met: training moves farther)
    # every version is a release of every worker (no sampling to amplify)
    assert ran.history[-1]["epsilon"] == pytest.approx(
        float(
            rdp.RdpAccountant()
            .compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.3), 20))
            .get_epsilon(1e-3)
        ),
        rel=1e-5,
    )


def test_local_dp_hides_the_sample_counts_and_still_learns(tmp_path: Path) -> None:
    data = job({"mode": "local", "clip": 1.0, "noise_multiplier": 0.02, "delta": 1e-3})
    ran = simulate(parse_job_spec(data), 2, Plugins(), tmp_path)
    last = ran.history[-1]
    assert all(h["samples"] == h["updates"] for h in ran.history)  # one "sample" each
    evals = [h["eval_loss"] for h in ran.history if "eval_loss" in h]
    assert len(evals) == 3 and evals[-1] < evals[0] / 2, evals
    # each client's updates are Gaussian releases of z / 2 (any update may become any other)
    expected = float(
        rdp.RdpAccountant()
        .compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.01), 12))
        .get_epsilon(1e-3)
    )
    assert last["epsilon"] == pytest.approx(expected, rel=1e-5)
