"""Workers on the coordinator's host exchange tensors through /dev/shm: same results as
over the socket, the path really taken, nothing left behind, and a worker killed
mid-job does not stop the others."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import safetensors.torch
import torch

from elastic.wire import shm

from .conftest import Cluster, big_job, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shm.shm_available(), reason="no writable /dev/shm"),
]

ROUNDS = 3


def run(
    cluster: Cluster, tmp_path: Path, *flags: str, spec: Path | None = None
) -> dict[str, torch.Tensor]:
    # fedavg: workers train their weights and send them from where they live, which
    # on this host is their segment (no copy on the way up)
    coordinator = cluster.coordinator(
        spec or big_job(tmp_path, rule="fedavg"), extra=("--exit-when-done", *flags)
    )
    workers = [cluster.worker(f"w{i}", *flags) for i in range(2)]
    cluster.wait_status("big", lambda s: s["state"] == "finished", 120, "the job to finish")
    assert coordinator.wait(30) == 0
    for w in workers:
        w.send_signal(signal.SIGTERM)
    for w in workers:
        w.wait(20)
    return safetensors.torch.load_file(cluster.state / "big" / "final.safetensors")


def segments_of(pids: list[int]) -> list[str]:
    return [
        n for n in os.listdir(shm.SHM_DIR) if any(n.startswith(f"elastic-{pid}-") for pid in pids)
    ]


def test_shared_memory_gives_the_socket_s_result_and_cleans_up(tmp_path: Path) -> None:
    through = Cluster(tmp_path / "shm")
    socket = Cluster(tmp_path / "tcp")
    for c in (through, socket):
        c.root.mkdir()
    try:
        got = run(through, through.root)
        want = run(socket, socket.root, "--no-shared-memory")
    finally:
        through.stop_all()
        socket.stop_all()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name  # the same bytes, by either path
    log = (through.root / "coordinator.log").read_text()
    sent = int(re.search(r"shm_sent=(\d+)", log).group(1))  # type: ignore[union-attr]
    assert sent >= 2 * ROUNDS, log[-2000:]  # every WORK went through /dev/shm
    worker_log = (through.root / "w0.log").read_text()
    assert "go through shared memory" in worker_log
    in_place = int(re.search(r"shm_in_place=(\d+)", worker_log).group(1))  # type: ignore[union-attr]
    assert in_place >= ROUNDS - 1, worker_log[
        -2000:
    ]  # the weights left from their place in the segment
    assert "shm_sent=0 " in (socket.root / "coordinator.log").read_text()
    assert "shared memory" not in (socket.root / "w0.log").read_text()
    assert segments_of([p.pid for p in through.procs]) == []  # every segment and probe unlinked


@pytest.mark.parametrize(
    "compression",
    ["", '[compression]\nupdate = ["fp16"]\nmodel = ["fp16"]\n'],
    ids=["exact", "fp16"],
)
def test_workers_on_this_host_take_gradients_on_the_shared_model_with_the_socket_s_result(
    tmp_path: Path, compression: str
) -> None:
    """Workers on this host take their gradients on the coordinator's copy of the
    model in its segment (no tensors in their WORK); elsewhere they get the model
    (or, with fp16 on the way down, rebuild it from deltas). Both hold the same
    bits, so the job ends with the same model."""
    fp16 = compression
    through = Cluster(tmp_path / "shm")
    socket = Cluster(tmp_path / "tcp")
    for c in (through, socket):
        c.root.mkdir()
    try:
        got = run(through, through.root, spec=big_job(through.root, rounds=4, extra=fp16))
        want = run(
            socket,
            socket.root,
            "--no-shared-memory",
            spec=big_job(socket.root, rounds=4, extra=fp16),
        )  # syncavg
    finally:
        through.stop_all()
        socket.stop_all()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert (
        "model reference shared with workers on this host"
        in (through.root / "coordinator.log").read_text()
    )
    assert "model reference shared" not in (socket.root / "coordinator.log").read_text()
    status = json.loads((through.state / "big" / "status.json").read_text())
    model_bytes = 1_000_001 * 4
    assert (
        status["history"][0]["bytes_sent"] < model_bytes / 100
    )  # no model on the socket, not even the first
    assert all(h["updates"] == 2 for h in status["history"])
    assert segments_of([p.pid for p in through.procs]) == []  # the reference's segment unlinked too


def test_a_worker_killed_mid_job_leaves_the_rest_running(cluster: Cluster, tmp_path: Path) -> None:
    cluster.coordinator(
        big_job(tmp_path, rounds=100_000, min_workers=1)
    )  # runs until the test ends
    victim = cluster.worker("w0")
    cluster.worker("w1")
    cluster.wait_status("big", lambda s: s["round"] >= 3, 60, "rounds through shared memory")
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    reached = cluster.status("big")["round"]  # type: ignore[index]
    cluster.wait_status("big", lambda s: s["round"] >= reached + 3, 60, "rounds with the survivor")
    since = cluster.status("big")["round"]  # type: ignore[index]
    cluster.worker("w2")  # a newcomer joins through a fresh segment
    cluster.wait_status(
        "big",
        lambda s: any(h["updates"] == 2 and h["round"] > since for h in s["history"][-5:]),
        60,
        "two workers again",
    )
    wait_for(
        lambda: "go through shared memory" in (tmp_path / "w2.log").read_text(),
        10,
        "w2 on the shared path",
    )
