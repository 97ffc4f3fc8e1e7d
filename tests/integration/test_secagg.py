"""Secure aggregation with real daemons: the coordinator folds masked inputs and
gives the rule their sum only, which is plain FedAvg's to the quantisation error;
workers crash and join between and during rounds, and the job goes on."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import Cluster, write_job
from .test_header_schema import RECORDER, recorded

pytestmark = pytest.mark.slow

JOB = """
[job]
id = "{id}"
task = "linreg"
rule = "fedavg"
rounds = {rounds}
min_workers = {workers}
max_workers = {workers}
round_timeout = 30
eval_every = {rounds}
[rule]
weighting = "uniform"
"""
SECURE = """
[privacy]
mechanism = "secagg"
clip = {clip}
stage_timeout = 3
"""


def test_the_secure_sum_is_plain_fedavg_s(cluster: Cluster, tmp_path: Path) -> None:
    secure = write_job(
        tmp_path / "sa.toml", JOB.format(id="sa", rounds=4, workers=4) + SECURE.format(clip=10.0)
    )
    plain = write_job(tmp_path / "pl.toml", JOB.format(id="pl", rounds=4, workers=4))
    cluster.coordinator(secure, plain)
    for w in ("w0", "w1", "w2", "w3"):
        cluster.worker(w)
    for job in ("sa", "pl"):
        cluster.wait_status(job, lambda s: s["state"] == "finished", 120, f"job {job}")
    status = cluster.status("sa")
    assert status is not None
    assert [h["secagg_survivors"] for h in status["history"]] == [4, 4, 4, 4]
    got = load_file(str(cluster.state / "sa" / "final.safetensors"))
    want = load_file(str(cluster.state / "pl" / "final.safetensors"))
    for name in want:  # 2 clip / 2^29 per element and round: far below float32's own error
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    log = (cluster.root / "coordinator.log").read_text()
    assert "Traceback" not in log


def test_five_clients_ten_rounds_with_churn(cluster: Cluster, tmp_path: Path) -> None:
    job = write_job(
        tmp_path / "ch.toml",
        JOB.format(id="ch", rounds=10, workers=3).replace("max_workers = 3\n", "")
        + SECURE.format(clip=1.0),
    )
    cluster.coordinator(job)
    workers = {w: cluster.worker(w) for w in ("w0", "w1", "w2", "w3", "w4")}
    cluster.wait_status("ch", lambda s: s["round"] >= 2, 120, "round 2")
    workers["w1"].kill()  # a crash, in whatever step it was
    cluster.wait_status("ch", lambda s: s["round"] >= 4, 120, "round 4 without w1")
    workers["w5"] = cluster.worker("w5")  # a newcomer
    workers["w2"].send_signal(signal.SIGTERM)  # a graceful leave
    cluster.wait_status("ch", lambda s: s["round"] >= 6, 120, "round 6")
    workers["w3"].kill()
    status = cluster.wait_status("ch", lambda s: s["state"] == "finished", 180, "the end")
    history = status["history"]
    assert [h["round"] for h in history] == list(range(1, 11))
    assert all(3 <= h["secagg_survivors"] <= 5 for h in history)
    assert history[-1]["eval_loss"] < 0.05  # (label noise 0.1: 0.01 at the optimum)
    log = (cluster.root / "coordinator.log").read_text()
    assert "Traceback" not in log


def test_masked_inputs_come_in_parts(cluster: Cluster, tmp_path: Path) -> None:
    """A 4 MB masked input, granted in 1 MiB parts, folded as they come."""
    records = tmp_path / "records"
    records.mkdir()
    cluster.env = {
        "ELASTIC_RECORD_HEADERS": str(records),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(RECORDER), os.environ.get("PYTHONPATH")])),
    }
    job = write_job(
        tmp_path / "pa.toml",
        """
[job]
id = "pa"
task = "synthetic"
rule = "fedavg"
rounds = 2
min_workers = 3
max_workers = 3
eval_every = 0
[task]
params = 1000000
[privacy]
mechanism = "secagg"
""",
    )
    cluster.coordinator(job, extra=("--upload-part", "1048576"))
    for w in ("w0", "w1", "w2"):
        cluster.worker(w, "--no-shared-memory")
    status = cluster.wait_status("pa", lambda s: s["state"] == "finished", 120, "job pa")
    assert [h["secagg_survivors"] for h in status["history"]] == [3, 3]
    assert ("UPDATE", "part", "list") in recorded(records)
