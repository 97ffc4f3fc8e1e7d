"""``allreduce`` across real worker processes: full-batch SGD exactly, with a worker
SIGKILLed and another joining mid-job while the survivors go on in their processes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from elastic_plugins.tasks.linreg import LinReg

from elastic.api import Shard
from elastic.membership.etcd.client import connect
from tests.etcd_server import EtcdServer, free_port

from .conftest import Cluster, write_job

pytestmark = pytest.mark.slow

LR, SEED = 0.1, 5
TASK = {"samples": 300, "features": 8, "noise": 0.1, "data_seed": 2}
PACED = Path(__file__).parent / "tasks" / "paced_linreg.py"


def full_batch_sgd(steps: int) -> dict[str, torch.Tensor]:
    """One process, the whole dataset every step: what every generation computes."""
    task = LinReg(TASK)
    model = task.build_model(SEED)
    x, y = task.train_dataset(Shard(0, 1, SEED), None).tensors
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model, x, y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def allreduce_job(tmp_path: Path, steps: int, min_workers: int, step_seconds: float = 0) -> Path:
    task = f"{PACED}:PacedLinReg" if step_seconds else "linreg"
    paced = f"step_seconds = {step_seconds}" if step_seconds else ""
    return write_job(
        tmp_path / "ar.toml",
        f"""
[job]
id = "ar"
task = "{task}"
rule = "allreduce"
rounds = {steps}
min_workers = {min_workers}
eval_every = 0
seed = {SEED}
[task]
samples = {TASK["samples"]}
features = {TASK["features"]}
noise = {TASK["noise"]}
data_seed = {TASK["data_seed"]}
{paced}
[train]
batch_size = 0
[rule]
lr = {LR}
checkpoint_every = 5
timeout = 10
""",
    )


def assert_equal_to_full_batch_sgd(cluster: Cluster, steps: int) -> None:
    got = safetensors.torch.load_file(cluster.state / "ar" / "final.safetensors")
    for name, tensor in full_batch_sgd(steps).items():
        assert torch.allclose(got[name], tensor, atol=1e-5, rtol=0), (
            name,
            (got[name] - tensor).abs().max(),
        )


def test_three_workers_equal_full_batch_sgd(cluster: Cluster, tmp_path: Path) -> None:
    """Through ``elastic run --local-workers 3``: a collective job on one machine."""
    done = subprocess.run(
        [sys.executable, "-m", "elastic", "run", str(allreduce_job(tmp_path, 20, 3)),
         "--local-workers", "3", "--quiet", "--state-dir", str(cluster.state)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    status = cluster.status("ar")
    assert status is not None and status["state"] == "finished"
    assert [h["round"] for h in status["history"]] == [5, 10, 15, 20]  # rank 0's checkpoints
    assert {h["world"] for h in status["history"]} == {3}
    assert {h["generation"] for h in status["history"]} == {1}
    assert status["totals"]["rejected"] == 0
    assert_equal_to_full_batch_sgd(cluster, 20)


def test_survivors_go_on_in_their_processes_and_a_wiped_out_job_resumes(
    cluster: Cluster, tmp_path: Path, etcd: EtcdServer
) -> None:
    """Through etcd (membership, and the generations' store: no process hosts it).
    At step 10 one of three is SIGKILLed and a fourth starts: the two go on in their
    processes, and the fourth joins the generation after; then all three die, and two
    new workers resume the job from its newest checkpoint. The result is full-batch
    SGD all along."""
    steps = 100
    flags = ("--membership", f"etcd://{etcd.url}/ar", "--lease-ttl", "3")
    cluster.coordinator(allreduce_job(tmp_path, steps, 2, step_seconds=0.1), extra=flags)
    workers = {w: cluster.worker(w, *flags) for w in ("w0", "w1", "w2")}
    cluster.wait_status("ar", lambda s: s.get("world") == 3 and s["round"] >= 10, 60, "step 10")
    workers["w2"].send_signal(signal.SIGKILL)
    workers["w3"] = cluster.worker("w3", *flags)
    killed = cluster.wait_status("ar", lambda s: s.get("world") == 2, 30, "a generation of two")
    joined = cluster.wait_status("ar", lambda s: s.get("world") == 3, 60, "w3 in a generation")
    assert killed["round"] < joined["round"] < steps  # the kill and the join landed mid-job
    for w in ("w0", "w1"):  # the survivors were never restarted
        assert workers[w].poll() is None
        assert (tmp_path / f"{w}.log").read_text().count("worker starting") == 1
    saved = cluster.wait_status(
        "ar", lambda s: s["checkpoint_step"] > joined["round"], 60, "a checkpoint of the three"
    )
    for w in ("w0", "w1", "w3"):
        workers[w].send_signal(signal.SIGKILL)
    cluster.wait_status("ar", lambda s: s["members"] == 0, 30, "every worker gone")
    for w in ("w4", "w5"):
        cluster.worker(w, *flags)
    status = cluster.wait_status("ar", lambda s: s["state"] == "finished", 120, "the job to finish")
    generations = [e for e in status["events"] if e["event"] == "generation"]
    worlds = [e["world"] for e in generations]
    three = worlds.index(3)  # (the first may start with two: min_workers = 2)
    assert 2 in worlds[three:] and 3 in worlds[worlds.index(2, three) :], worlds
    resumed = generations[-1]
    assert saved["checkpoint_step"] <= resumed["step"] < steps  # from the checkpoint
    log = (tmp_path / "coordinator.log").read_text()
    assert re.search(rf"members=w[45],w[45] step={resumed['step']} state_from=checkpoint", log)
    assert_equal_to_full_batch_sgd(cluster, steps)
    client = connect(f"etcd://{etcd.url}/ar")
    try:  # the generations met in etcd
        keys = [meta.key.decode() for _, meta in client.get_prefix("/elastic/ar/collective/ar/")]
    finally:
        client.close()
    last = f"/elastic/ar/collective/ar/ar/{status['generation']}/"
    assert any(key.startswith(last) for key in keys), keys[:5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_generation_runs_on_nccl(cluster: Cluster, tmp_path: Path) -> None:
    """One process per GPU (two where there are two), NCCL's all-reduce; the result is
    full-batch SGD as on the CPU, to GPU float tolerance."""
    gpus = min(torch.cuda.device_count(), 2)
    cluster.coordinator(allreduce_job(tmp_path, 20, gpus), extra=("--exit-when-done",))
    for i in range(gpus):
        cluster.spawn(
            f"w{i}", "worker", "--coordinator", cluster.address, "--id", f"w{i}",
            "--device", f"cuda:{i}", "--coordinator-timeout", "5",
        )  # fmt: skip
    cluster.wait_status("ar", lambda s: s["state"] == "finished", 120, "the job to finish")
    assert "backend=nccl" in (tmp_path / "w0.log").read_text()
    got = safetensors.torch.load_file(cluster.state / "ar" / "final.safetensors")
    for name, tensor in full_batch_sgd(20).items():
        assert torch.allclose(got[name], tensor, atol=1e-4, rtol=0), name


def test_a_big_checkpoint_comes_to_the_coordinator_in_parts(cluster: Cluster, tmp_path: Path):
    """4 MB checkpoints over TCP (no shared memory), granted 1 MiB at a time: the
    coordinator holds a part in its receive buffers, and commits what full-batch SGD
    on the synthetic task gives."""
    from elastic_plugins.tasks.synthetic import Synthetic

    job = write_job(
        tmp_path / "big.toml",
        """
[job]
id = "ar"
task = "synthetic"
rule = "allreduce"
rounds = 4
min_workers = 2
max_workers = 2
eval_every = 0
[task]
params = 1000000
[train]
batch_size = 0
[rule]
lr = 0.01
checkpoint_every = 2
""",
    )
    cluster.coordinator(job, extra=("--upload-part", "1048576", "--log-level", "debug"))
    for w in ("w0", "w1"):
        cluster.worker(w, "--no-shared-memory")
    status = cluster.wait_status("ar", lambda s: s["state"] == "finished", 90, "the job to finish")
    assert [h["round"] for h in status["history"]] == [2, 4]
    grants = (tmp_path / "coordinator.log").read_text().count("upload granted worker=w")
    assert grants >= 2 * 4  # two checkpoints of four parts or more
    task = Synthetic({"params": 1_000_000})
    model = task.build_model(0)
    x, y = task.train_dataset(Shard(0, 1, 0), None).tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):
        opt.zero_grad()
        task.loss(model, x, y).backward()
        opt.step()
    got = safetensors.torch.load_file(cluster.state / "ar" / "final.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.allclose(got[name], tensor, atol=1e-6, rtol=0), name


def test_pause_resume_and_finish_a_collective_job(cluster: Cluster, tmp_path: Path) -> None:
    """The operator's controls reach workers that train among themselves: they stop
    after a step they agree on (pause, finish) and go on from it (resume); finish
    makes that step's state the final model."""
    from .test_job_cli import as_json

    control = f"tcp://127.0.0.1:{free_port()}"
    at = ("--coordinator", control)
    cluster.coordinator(
        allreduce_job(tmp_path, 100_000, 2, step_seconds=0.05), extra=("--control", control)
    )
    workers = [cluster.worker(w) for w in ("w0", "w1")]
    cluster.wait_status("ar", lambda s: s["round"] >= 5, 60, "five steps")
    assert as_json("job", "pause", "ar", *at)["desired"] == "paused"
    paused = cluster.wait_status("ar", lambda s: s["state"] == "paused", 30, "the job to pause")
    time.sleep(0.5)
    assert cluster.status("ar")["round"] == paused["round"]  # nothing trains while paused
    as_json("job", "resume", "ar", *at)
    cluster.wait_status("ar", lambda s: s["round"] >= paused["round"] + 5, 30, "steps again")
    as_json("job", "finish", "ar", *at)
    status = cluster.wait_status("ar", lambda s: s["state"] == "finished", 30, "the job to end")
    assert paused["round"] + 5 <= status["round"] < 100_000
    assert status["history"][-1]["round"] == status["round"]  # the final model is that step's
    assert_equal_to_full_batch_sgd(cluster, status["round"])
    assert all(w.poll() is None for w in workers)  # the workers wait for what comes next


def test_a_frozen_worker_is_left_behind_by_the_collective_timeout(
    cluster: Cluster, tmp_path: Path
) -> None:
    """SIGSTOP: the peer neither dies nor answers. The others' collective gives up
    after the rule's timeout and they go on without it; woken (SIGCONT), it joins
    again. Nothing is lost or counted twice: the result is full-batch SGD."""
    steps = 120
    job = allreduce_job(tmp_path, steps, 2, step_seconds=0.05)
    job.write_text(job.read_text().replace("timeout = 10", "timeout = 3"))
    cluster.coordinator(job)
    workers = {w: cluster.worker(w) for w in ("w0", "w1", "w2")}
    cluster.wait_status("ar", lambda s: s.get("world") == 3 and s["round"] >= 5, 60, "step 5")
    frozen = cluster.wait_status("ar", lambda s: s["ranks"][-1] in workers, 5, "ranks")
    victim = frozen["ranks"][-1]  # not rank 0
    workers[victim].send_signal(signal.SIGSTOP)
    try:
        cluster.wait_status("ar", lambda s: s.get("world") == 2, 30, "a generation without it")
        going = cluster.wait_status("ar", lambda s: s["round"] >= frozen["round"] + 5, 30, "steps")
    finally:
        workers[victim].send_signal(signal.SIGCONT)
    status = cluster.wait_status("ar", lambda s: s["state"] == "finished", 120, "the job to finish")
    assert going["round"] < steps
    worlds = [e["world"] for e in status["events"] if e["event"] == "generation"]
    assert 2 in worlds[worlds.index(3) :] and worlds[-1] == 3, worlds  # woken, it came back
    assert all(w.poll() is None for w in workers.values())  # nobody restarted
    assert_equal_to_full_batch_sgd(cluster, steps)
