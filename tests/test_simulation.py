"""Jobs run in one process with the real engine and worker runtime: the federated
rules on a strongly non-IID split, and the ``elastic simulate`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elastic.errors import ConfigError, JobSpecError
from elastic.jobspec import parse_job_spec
from elastic.plugins import Plugins
from elastic.simulation import simulate

pytestmark = pytest.mark.slow


def non_iid(rule: str, rule_params: dict | None = None, **train) -> dict:
    return {
        "job": {
            "id": "ni",
            "task": "digits",
            "rule": rule,
            "rounds": 30,
            "min_workers": 4,
            "eval_every": 1,
        },
        "task": {"alpha": 0.1},  # Dirichlet 0.1: most workers see a few classes
        "train": {"local_epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9, **train},
        "rule": rule_params or {},
        "checkpoint": {"every": 10},
    }


@pytest.mark.parametrize(
    "rule, params, train",
    [
        ("fedavg", {}, {}),
        ("fedadam", {}, {}),
        ("fedavg", {}, {"prox_mu": 0.01}),  # FedProx
    ],
)
def test_rules_reach_090_on_non_iid_digits_within_30_rounds(
    tmp_path: Path, rule: str, params: dict, train: dict
) -> None:
    job = simulate(parse_job_spec(non_iid(rule, params, **train)), 4, Plugins(), tmp_path)
    accuracy = [h["accuracy"] for h in job.history]
    assert len(accuracy) == 30 and max(accuracy) >= 0.90, accuracy
    assert job.history[-1]["updates"] == 4 and (tmp_path / "ni" / "final.safetensors").exists()
    # the global model on the training data, beside the clients' local loss
    losses = [h["global_train_loss"] for h in job.history]
    assert (
        losses[-1] < losses[0] / 2
        and job.history[-1]["global_train_loss"] != job.history[-1]["loss"]
    )


def test_virtual_clients_with_stragglers_in_simulation(tmp_path: Path) -> None:
    """200 clients on 2 simulated workers, 20 a round, half of them stragglers."""
    data = non_iid("fedavg", local_epochs=5, batch_size=8, stragglers=0.5)
    data["job"] |= {"clients": 200, "clients_per_round": 20, "min_workers": 2, "rounds": 20}
    data["task"] = {"partition": "iid"}
    job = simulate(parse_job_spec(data), 2, Plugins(), tmp_path)
    assert all(h["updates"] == 20 and len(set(h["clients"])) == 20 for h in job.history)
    assert job.history[-1]["accuracy"] >= 0.7, [round(h["accuracy"], 3) for h in job.history]


def test_async_rules_run_in_simulation_too(tmp_path: Path) -> None:
    spec = parse_job_spec(
        non_iid("async", {"mixing": 0.5, "max_staleness": 2})
        | {
            "job": {
                "id": "as",
                "task": "digits",
                "rule": "async",
                "rounds": 40,
                "min_workers": 4,
                "eval_every": 10,
            }
        }
    )
    job = simulate(spec, 4, Plugins(), tmp_path)
    assert [h["version"] for h in job.history] == list(range(1, 41))
    assert max(int(t) for t in job.totals["staleness_histogram"]) <= 2


def test_too_few_workers_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs min_workers = 4; simulate at least that many"):
        simulate(parse_job_spec(non_iid("fedavg")), 2, Plugins(), tmp_path)


def test_simulate_command(tmp_path: Path) -> None:
    spec = tmp_path / "job.toml"
    spec.write_text(
        '[job]\nid = "lin"\ntask = "linreg"\nrule = "fedavg"\nrounds = 5\nmin_workers = 2\n'
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastic",
            "simulate",
            str(spec),
            "--workers",
            "3",
            "--quiet",
            "--state-dir",
            str(tmp_path / "s"),
            "--summary",
            str(tmp_path / "out.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads((tmp_path / "out.json").read_text())
    assert figures["state"] == "finished" and figures["rounds"] == 5


def compressed(model: list[str], update: list[str] | None = None) -> dict:
    spec = non_iid("fedavg")
    spec["task"] = {"alpha": 0.5}
    spec["job"] = spec["job"] | {"rounds": 15, "eval_every": 15}
    spec["compression"] = {"model": model, "update": update or []}
    return spec


def test_a_lossless_model_downlink_changes_nothing_but_the_bytes(tmp_path: Path) -> None:
    plain = simulate(parse_job_spec(compressed([])), 4, Plugins(), tmp_path / "a")
    zstd = simulate(parse_job_spec(compressed(["zstd"])), 4, Plugins(), tmp_path / "b")
    for name, t in plain.model.state_dict().items():
        torch.testing.assert_close(zstd.model.state_dict()[name], t, atol=1e-5, rtol=1e-4)
    first, later = zstd.history[0]["bytes_sent"], [h["bytes_sent"] for h in zstd.history[1:]]
    assert first == plain.history[0]["bytes_sent"]  # round 1: everyone gets the whole model
    assert max(later) < first  # then deltas, compressed


def test_lossy_both_ways_still_learns(tmp_path: Path) -> None:
    job = simulate(
        parse_job_spec(compressed(["fp16", "zstd"], ["qsgd:4", "zstd"])), 4, Plugins(), tmp_path
    )
    assert job.history[-1]["accuracy"] >= 0.9, job.history[-1]
    full = job.history[0]["bytes_sent"]
    assert all(h["bytes_sent"] < full / 2 for h in job.history[1:])
    assert all(h["bytes_received"] < full / 4 for h in job.history)


def test_model_compression_needs_a_synchronous_rule(tmp_path: Path) -> None:
    spec = parse_job_spec(non_iid("async") | {"compression": {"model": ["fp16"]}})
    with pytest.raises(JobSpecError, match="needs a synchronous rule"):
        simulate(spec, 4, Plugins(), tmp_path)


def test_simulated_client_speeds_leave_slow_clients_out_at_the_deadline(tmp_path: Path) -> None:
    from elastic.simulation import ClientSpeeds

    data = non_iid("fedavg", local_epochs=5, batch_size=8)
    data["job"] |= {"clients": 100, "clients_per_round": 10, "min_workers": 2, "rounds": 6}
    data["job"]["round_timeout"] = 2.0
    data["task"] = {"partition": "iid"}
    spec = parse_job_spec(data)
    slow = simulate(spec, 2, Plugins(), tmp_path / "a", speeds=ClientSpeeds(1.0, 0.01, 0))
    assert all(h["seconds"] <= 2.0 + 1e-6 for h in slow.history)  # simulated seconds
    assert sum(h["updates"] for h in slow.history) < 60  # some were too slow
    alike = simulate(spec, 2, Plugins(), tmp_path / "b", speeds=ClientSpeeds(0.0, 0.001, 0))
    assert all(h["updates"] == 10 for h in alike.history)
    # every client alike: a round lasts as long as its biggest client's 5 epochs
    assert all(0 < h["seconds"] <= 5 * 0.001 * 20 for h in alike.history)


def test_a_bad_client_speed_is_one_clear_error() -> None:
    from elastic.simulation import ClientSpeeds

    with pytest.raises(ConfigError, match="use lognormal:SIGMA"):
        ClientSpeeds.parse("gamma:2", 0.01, 0)
    assert ClientSpeeds.parse("lognormal:0", 0.01, 0).speed("7") == 1.0


def test_a_collective_job_is_refused_with_the_command_that_runs_it(tmp_path) -> None:
    spec = parse_job_spec(
        {"job": {"id": "c", "task": "linreg", "rule": "allreduce", "rounds": 5, "min_workers": 3}}
    )
    with pytest.raises(ConfigError, match="use elastic run JOB.toml --local-workers 3 instead"):
        simulate(spec, 3, Plugins(), tmp_path)
