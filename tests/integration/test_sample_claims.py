"""A worker that claims 10^12 samples (its weight in FedAvg) among honest ones, with
real daemons: its claim is clipped to what it holds, counted, and the model is the
honest job's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import Cluster, free_port, wait_for, write_job
from .test_metrics import scrape

pytestmark = pytest.mark.slow

TASK = Path(__file__).parent / "tasks" / "claims.py"
JOB = """
[job]
id = "{id}"
task = "{task}:Claims"
rule = "fedavg"
rounds = 4
min_workers = 3
max_workers = 3
round_timeout = 30
eval_every = 4
[task]
samples = 600
"""


def test_a_claim_of_a_trillion_samples_is_clipped_to_what_the_worker_holds(
    cluster: Cluster, tmp_path: Path
) -> None:
    jobs = [write_job(tmp_path / f"{j}.toml", JOB.format(id=j, task=TASK)) for j in ("ok", "lie")]
    port = free_port()
    coordinator = cluster.coordinator(*jobs, extra=("--metrics-port", str(port)))
    cluster.worker("w0")
    cluster.worker("w1")
    cluster.spawn(  # the same worker, but it claims 10^12 samples in job "lie"
        "w2",
        "worker",
        *("--coordinator", cluster.address, "--id", "w2", "--device", "cpu", "--threads", "1"),
        env={"CLAIM_JOB": "lie", "CLAIM_SAMPLES": "1e12"},
    )
    for job in ("ok", "lie"):
        cluster.wait_status(job, lambda s: s["state"] == "finished", 120, f"job {job}")
    lie, ok = cluster.status("lie"), cluster.status("ok")
    assert lie is not None and ok is not None
    assert lie["totals"]["samples_clipped"] == 4  # once a round
    assert ok["totals"]["samples_clipped"] == 0
    clipped = ("elastic_samples_clipped_total", (("job", "lie"),))
    wait_for(lambda: scrape(port).get(clipped) == 4, 10, "the snapshot to catch up")
    metrics = scrape(port)
    assert metrics[("elastic_samples_clipped_total", (("job", "ok"),))] == 0
    assert coordinator.poll() is None  # (it serves on, its model and metrics to read)
    assert (
        "sample count clipped job=lie sender=w2 claimed=1000000000000 bound=200"
        in (cluster.root / "coordinator.log").read_text()
    )
    got = load_file(str(cluster.state / "lie" / "final.safetensors"))
    want = load_file(str(cluster.state / "ok" / "final.safetensors"))
    for name in want:  # weighed as it should be: the honest job's model
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    assert lie["final"]["eval_loss"] == pytest.approx(ok["final"]["eval_loss"])
