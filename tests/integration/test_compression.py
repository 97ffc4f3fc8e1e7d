"""Compressed updates between real processes: the coordinator decodes any chain from
the header alone, and the job still learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.etcd_server import free_port

from .conftest import Cluster, wait_for, write_job
from .test_job_cli import elastic

pytestmark = pytest.mark.slow


def test_fedavg_with_quantised_compressed_updates(cluster: Cluster, tmp_path: Path) -> None:
    job = write_job(tmp_path / "cz.toml", """
[job]
id = "cz"
task = "digits"
rule = "fedavg"
rounds = 15
min_workers = 3
partitions = 3
eval_every = 5
[train]
local_epochs = 2
lr = 0.05
momentum = 0.9
[compression]
update = ["qsgd:4", "zstd"]
""")
    cluster.coordinator(job)
    for w in ("w0", "w1", "w2"):
        cluster.worker(w)
    done = cluster.wait_status("cz", lambda s: s["state"] == "finished", 120, "the compressed job to finish")
    assert [h["round"] for h in done["history"]] == list(range(1, 16)) and all(h["updates"] == 3 for h in done["history"])
    assert done["final"]["accuracy"] >= 0.88, done["final"]
    model_bytes = done["history"][0]["bytes_sent"] / 3  # WORK goes out whole: one model per worker
    sent_up = done["totals"]["bytes_received"] / (15 * 3)
    assert sent_up < model_bytes / 6, (sent_up, model_bytes)  # 4-bit levels, then zstd
    assert math.isfinite(done["last"]["loss"])


def test_both_ways_with_a_worker_joining_late(cluster: Cluster, tmp_path: Path) -> None:
    """The model comes down as compressed deltas to workers that hold the last
    version; a worker that joins later gets it whole first, then deltas too."""
    job = write_job(tmp_path / "cz.toml", """
[job]
id = "cz"
task = "digits"
rule = "fedavg"
rounds = 25
min_workers = 2
partitions = 3
eval_every = 5
[train]
local_epochs = 4
lr = 0.05
momentum = 0.9
[compression]
update = ["topk:0.1", "fp16", "zstd"]
model = ["fp16", "zstd"]
""")
    control = f"tcp://127.0.0.1:{free_port()}"
    cluster.coordinator(job, extra=("--control", control))
    for w in ("w0", "w1"):
        cluster.worker(w)
    cluster.wait_status("cz", lambda s: s["round"] >= 3, 60, "three rounds with two workers")
    # Paused while w2 starts (seconds of imports): the job must not end before it joins.
    assert elastic("job", "pause", "cz", "--coordinator", control).returncode == 0
    cluster.worker("w2")
    wait_for(lambda: "worker joined worker=w2" in (tmp_path / "coordinator.log").read_text(), 60, "w2 to join")
    assert elastic("job", "resume", "cz", "--coordinator", control).returncode == 0
    done = cluster.wait_status("cz", lambda s: s["state"] == "finished", 120, "the job to finish")
    history = done["history"]
    whole = history[0]["bytes_sent"] / 2  # round 1: the whole model to each of two workers
    three = [h for h in history if h["participants"] == 3]
    assert three, "w2 never took part"
    assert any(h["bytes_sent"] > whole for h in three)  # w2's first WORK: the whole model
    assert all(h["bytes_sent"] < whole for h in history[-3:])  # later: three deltas < one model
    assert done["final"]["accuracy"] >= 0.88, done["final"]
    assert "need_full_model" not in (tmp_path / "coordinator.log").read_text()
