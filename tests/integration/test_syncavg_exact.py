"""syncavg across 3 real worker processes == single-process full-batch SGD on the union."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import safetensors.torch
import torch
from elastic_plugins.tasks.linreg import LinReg

from elastic.api import Shard
from elastic.membership.etcd.client import Keys, connect
from tests.etcd_server import EtcdServer

from .conftest import Cluster, wait_for, write_job

pytestmark = pytest.mark.slow

STEPS, LR, SEED = 20, 0.1, 5
TASK = {"samples": 300, "features": 8, "noise": 0.1, "data_seed": 2}


def reference(steps: int = STEPS) -> dict[str, torch.Tensor]:
    task = LinReg(TASK)
    model = task.build_model(SEED)
    shards = [task.train_dataset(Shard(i, 3, SEED), None) for i in range(3)]
    x = torch.cat([s.tensors[0] for s in shards])
    y = torch.cat([s.tensors[1] for s in shards])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model, x, y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def linreg_job(tmp_path: Path, steps: int, min_workers: int) -> Path:
    return write_job(
        tmp_path / "lin.toml",
        f"""
[job]
id = "lin"
task = "linreg"
rule = "syncavg"
rounds = {steps}
min_workers = {min_workers}
eval_every = 0
seed = {SEED}
[task]
samples = {TASK["samples"]}
features = {TASK["features"]}
noise = {TASK["noise"]}
data_seed = {TASK["data_seed"]}
[train]
batch_size = 0
[rule]
lr = {LR}
[checkpoint]
every = 50
""",
    )


def test_syncavg_three_workers_equals_full_batch_sgd(cluster: Cluster, tmp_path: Path) -> None:
    job = linreg_job(tmp_path, STEPS, 3)
    coordinator = cluster.coordinator(job, extra=("--exit-when-done",))
    for i in range(3):
        cluster.worker(f"w{i}")
    status = cluster.wait_status(
        "lin", lambda s: s["state"] == "finished", 90, "syncavg job to finish"
    )
    assert [h["round"] for h in status["history"]] == list(range(1, STEPS + 1))
    assert all(h["updates"] == 3 for h in status["history"])
    got = safetensors.torch.load_file(cluster.state / "lin" / "final.safetensors")
    want = reference()
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, atol=1e-5, rtol=0), (
            name,
            (got[name] - tensor).abs().max(),
        )
    assert coordinator.wait(20) == 0  # --exit-when-done: a clean exit once the job is done
    log = (tmp_path / "coordinator.log").read_text()
    assert "coordinator stopping reason=all jobs done bytes_in=" in log and "rejected=none" in log
    # and it actually learned something: far from the initial weights
    assert (got["weight"] - LinReg(TASK).build_model(SEED).weight.detach()).abs().max() > 0.1


def test_a_worker_lost_mid_job_starts_a_new_generation_and_stays_exact(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Shards follow the members: after w0 dies, two workers split all the data, so
    every step is still the full-batch gradient and the result the same."""
    steps = 400
    job = linreg_job(tmp_path, steps, 2)
    cluster.coordinator(job)
    victim = cluster.worker("w0")
    cluster.worker("w1")
    cluster.worker("w2")
    cluster.wait_status(
        "lin",
        lambda s: s["history"] and s["history"][-1]["updates"] == 3,
        60,
        "a step with all three",
    )
    victim.send_signal(signal.SIGKILL)
    status = cluster.wait_status(
        "lin", lambda s: s["state"] == "finished", 120, "the job to finish with two"
    )
    history = status["history"]
    assert [h["round"] for h in history] == list(range(1, steps + 1))
    assert history[-1]["updates"] == 2 and history[-1]["generation"] > max(
        h["generation"] for h in history if h["updates"] == 3
    )
    got = safetensors.torch.load_file(cluster.state / "lin" / "final.safetensors")
    for name, tensor in reference(steps).items():
        assert torch.allclose(got[name], tensor, atol=1e-5, rtol=0), (
            name,
            (got[name] - tensor).abs().max(),
        )


def test_a_worker_joining_through_etcd_gets_a_shard_in_the_next_generation(
    cluster: Cluster, tmp_path: Path, etcd: EtcdServer
) -> None:
    """A third worker registers in etcd mid-job: the next step is a new generation with
    the data split three ways, the two running workers go on without a restart, and
    the result is still full-batch SGD on all the data."""
    steps = 300
    url = f"etcd://{etcd.url}/rdv"
    flags = ("--membership", url, "--lease-ttl", "3")
    cluster.coordinator(linreg_job(tmp_path, steps, 2), extra=flags)
    first = [cluster.worker(w, *flags) for w in ("w0", "w1")]
    cluster.wait_status("lin", lambda s: s["round"] >= 20, 60, "steps with two workers")
    # Paused while w2 starts (a few seconds of imports): the job must not end first.
    client = connect(url)
    try:
        client.put(Keys("rdv").job("lin", "state"), "paused")
        cluster.wait_status("lin", lambda s: s["state"] == "paused", 30, "the job to pause")
        cluster.worker("w2", *flags)
        wait_for(
            lambda: "worker joined worker=w2" in (tmp_path / "coordinator.log").read_text(),
            60,
            "w2 to join",
        )
        client.put(Keys("rdv").job("lin", "state"), "running")
    finally:
        client.close()
    status = cluster.wait_status(
        "lin", lambda s: s["state"] == "finished", 120, "the job to finish"
    )
    history = status["history"]
    assert [h["round"] for h in history] == list(range(1, steps + 1))
    two = [h for h in history if h["updates"] == 2]
    three = [h for h in history if h["updates"] == 3]
    assert two and three and min(h["round"] for h in three) > max(h["round"] for h in two)
    assert min(h["generation"] for h in three) > max(
        h["generation"] for h in two
    )  # a new generation
    assert all(p.poll() is None for p in first)  # the survivors were never restarted
    for w in ("w0", "w1"):
        assert (tmp_path / f"{w}.log").read_text().count("worker starting") == 1
    got = safetensors.torch.load_file(cluster.state / "lin" / "final.safetensors")
    for name, tensor in reference(steps).items():
        assert torch.allclose(got[name], tensor, atol=1e-5, rtol=0), (
            name,
            (got[name] - tensor).abs().max(),
        )
    client = connect(url)  # the generation is published in etcd for anyone to see
    try:
        assert wait_for(
            lambda: (
                client.get(Keys("rdv").path("rendezvous/lin/generation"))[0]
                == str(history[-1]["generation"]).encode()
            ),
            5,
            "the generation in etcd",
        )
    finally:
        client.close()
