"""Differential privacy with real daemons: a coordinator and two worker processes
run a job of 30 virtual clients until its privacy budget is spent. The ε spent is
in the status, in ``elastic job status`` and in the Prometheus metrics; the job ends
in ``budget_spent`` before the round that would pass ``max_epsilon``; a worker
killed mid-job changes nothing of that."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import rdp

from tests.etcd_server import free_port

from .conftest import Cluster, wait_for, write_job
from .test_metrics import get, scrape

pytestmark = pytest.mark.slow


def epsilon(rounds: int) -> float:
    event = dp_accounting.PoissonSampledDpEvent(8 / 30, dp_accounting.GaussianDpEvent(1.5))
    return float(
        rdp.RdpAccountant()
        .compose(dp_accounting.SelfComposedDpEvent(event, rounds))
        .get_epsilon(1e-3)
    )


def test_a_job_runs_until_its_privacy_budget_is_spent(cluster: Cluster, tmp_path: Path) -> None:
    limit = (epsilon(9) + epsilon(10)) / 2
    job = write_job(
        tmp_path / "dp.toml",
        f"""
[job]
id = "dp"
task = "digits"
rule = "fedavg"
rounds = 100
min_workers = 1
clients = 30
clients_per_round = 8
client_sampling = "poisson"
eval_every = 0
[task]
partition = "iid"
[train]
batch_size = 16
[privacy]
clip = 2.0
noise_multiplier = 1.5
delta = 1e-3
max_epsilon = {limit}
clip_on = "worker"
""",
    )
    port, control = free_port(), f"tcp://127.0.0.1:{free_port()}"
    cluster.coordinator(job, extra=("--metrics-port", str(port), "--control", control))
    workers = [cluster.worker("w0"), cluster.worker("w1")]
    cluster.wait_status("dp", lambda s: s["round"] >= 3, 60, "round 3")
    workers[1].kill()  # the other one serves every client from now on
    status = cluster.wait_status(
        "dp", lambda s: s["state"] == "budget_spent", 120, "the budget to be spent"
    )
    assert status["round"] == 9, status["round"]
    spent = [h["epsilon"] for h in status["history"]]
    assert spent == pytest.approx([epsilon(r) for r in range(1, 10)], rel=1e-5)
    assert status["final"]["stopped"].startswith("privacy budget spent")
    assert "accuracy" in status["final"]  # the final model was scored

    env = {**os.environ, **cluster.env}
    shown = subprocess.run(
        [sys.executable, "-m", "elastic", "job", "status", "dp", "--coordinator", control],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "budget_spent" in shown.stdout and f"ε = {spent[-1]:.4g}" in shown.stdout
    assert "privacy budget spent" in shown.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "elastic", "job", "status", "dp", "--coordinator", control]
        + ["--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(as_json.stdout)["last"]["epsilon"] == spent[-1]

    wait_for(lambda: get(port, "/healthz")[0] == 200, 30, "/healthz")
    figures = scrape(port)
    assert figures[("elastic_rule_figure", (("job", "dp"), ("name", "epsilon")))] == spent[-1]
    assert figures[("elastic_job_state", (("job", "dp"), ("state", "budget_spent")))] == 1.0
