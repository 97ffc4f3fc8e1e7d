"""Workers register in a real etcd; the coordinator follows membership by watching it."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from elastic.membership.etcd.client import Keys, connect
from tests.etcd_server import EtcdServer

from .conftest import Cluster, wait_for
from .test_failures import digits_job

pytestmark = pytest.mark.slow
TTL = 3.0


def test_workers_join_and_leave_through_etcd(
    cluster: Cluster, tmp_path: Path, etcd: EtcdServer
) -> None:
    url = f"etcd://{etcd.url}/it"
    # min_workers 2: once w0 and w1 are gone the job waits for w3, however fast rounds go
    job = digits_job(tmp_path, rounds=60, min_workers=2, epochs=8)
    # A zmq heartbeat timeout far beyond the test: only etcd (or a dead connection) removes workers.
    cluster.coordinator(job, extra=("--membership", url, "--heartbeat-timeout", "600"))
    workers = {
        w: cluster.worker(w, "--membership", url, "--lease-ttl", str(TTL))
        for w in ("w0", "w1", "w2")
    }
    cluster.wait_status(
        "dg",
        lambda s: len(s.get("in_progress", {}).get("participants", [])) == 3,
        60,
        "a round with all three",
    )
    log = tmp_path / "coordinator.log"

    workers["w0"].send_signal(signal.SIGTERM)
    started = time.monotonic()
    wait_for(lambda: "worker left worker=w0" in log.read_text(), 1.5, "w0 to leave after SIGTERM")
    assert time.monotonic() - started < 1.0 + 0.5
    assert workers["w0"].wait(10) == 0

    workers["w1"].send_signal(signal.SIGKILL)
    wait_for(
        lambda: "worker left worker=w1" in log.read_text(),
        TTL + 2,
        "w1 to be removed within its lease TTL",
    )

    cluster.worker("w3", "--membership", url, "--lease-ttl", str(TTL))  # joins mid-job
    cluster.wait_status(
        "dg",
        lambda s: "w3" in s.get("in_progress", {}).get("participants", []),
        30,
        "w3 in a round",
    )
    done = cluster.wait_status("dg", lambda s: s["state"] == "finished", 120, "the job to finish")
    assert [h["round"] for h in done["history"]] == list(range(1, 61))
    client = connect(url)  # the leader keeps the rendezvous generation in etcd
    value, _ = client.get(Keys("it").path("rendezvous/dg/generation"))
    assert value == b"0"  # FedAvg keeps fixed shards: never a new generation
    client.close()


def test_unreachable_etcd_stops_a_worker_with_one_clear_line(
    cluster: Cluster, tmp_path: Path
) -> None:
    from tests.etcd_server import free_port

    port = free_port()
    worker = cluster.worker("w0", "--membership", f"etcd://127.0.0.1:{port}/it")
    assert worker.wait(60) == 2
    lines = [line for line in (tmp_path / "w0.log").read_text().splitlines() if line.strip()]
    assert any(
        f"etcd unreachable at 127.0.0.1:{port}" in line and "fix --membership" in line
        for line in lines
    ), lines
    assert not any("Traceback" in line for line in lines)


def test_pause_resume_and_cancel_through_etcd(
    cluster: Cluster, tmp_path: Path, etcd: EtcdServer
) -> None:
    url = f"etcd://{etcd.url}/ctl"
    job = digits_job(tmp_path, rounds=500, min_workers=1, epochs=2)
    cluster.coordinator(job, extra=("--membership", url))
    cluster.worker("w0", "--membership", url)
    cluster.wait_status("dg", lambda s: s["round"] >= 2, 60, "two rounds")
    client, keys = connect(url), Keys("ctl")
    try:
        client.put(keys.job("dg", "state"), "paused")
        paused = cluster.wait_status("dg", lambda s: s["state"] == "paused", 30, "the job to pause")
        time.sleep(1.0)
        assert cluster.status("dg")["round"] == paused["round"]  # nothing runs while paused
        status, _ = client.get(keys.job("dg", "status"))  # the leader reports in etcd too
        assert json.loads(status)["state"] == "paused"
        client.put(keys.job("dg", "state"), "running")
        cluster.wait_status("dg", lambda s: s["round"] > paused["round"], 30, "the job to go on")
        client.put(keys.job("dg", "state"), "cancelled")
        cancelled = cluster.wait_status(
            "dg", lambda s: s["state"] == "cancelled", 30, "the job to be cancelled"
        )
        assert list((cluster.state / "dg").glob("ckpt-*.pt"))  # its last checkpoint stays
        assert cancelled["round"] < 500
    finally:
        client.close()


def test_etcd_frozen_mid_job_loses_nothing(
    cluster: Cluster, tmp_path: Path, etcd: EtcdServer
) -> None:
    """etcd stops answering for a while (shorter than the leases): workers keep their
    rounds, the coordinator commits nothing it cannot fence, and the job finishes."""
    url = f"etcd://{etcd.url}/frz"
    job = digits_job(tmp_path, rounds=40, min_workers=2, epochs=4)
    coordinator = cluster.coordinator(job, extra=("--membership", url, "--lease-ttl", "12"))
    for w in ("w0", "w1"):
        cluster.worker(w, "--membership", url, "--lease-ttl", "12", "--coordinator-timeout", "30")
    cluster.wait_status("dg", lambda s: s["round"] >= 2, 60, "two rounds")
    assert etcd.proc is not None
    etcd.proc.send_signal(signal.SIGSTOP)
    time.sleep(5.0)  # longer than an etcd call may take (3 s), shorter than the leases
    etcd.proc.send_signal(signal.SIGCONT)
    done = cluster.wait_status(
        "dg", lambda s: s["state"] == "finished", 180, "the job to finish after etcd came back"
    )
    assert [h["round"] for h in done["history"]] == list(range(1, 41))  # none lost, none twice
    assert [h["version"] for h in done["history"]] == list(range(1, 41))
    assert coordinator.poll() is None  # still leading, still serving
    assert "worker left" not in (tmp_path / "coordinator.log").read_text()  # nobody was dropped


def test_etcd_away_longer_than_the_lease_the_leader_steps_down_and_leads_again(
    cluster: Cluster, tmp_path: Path, etcd: EtcdServer
) -> None:
    """All leases run out while etcd is frozen: the coordinator stops serving, stands
    by in the same process, wins again once etcd is back, resumes from its newest
    checkpoint, and the workers (re-registered by themselves) finish the job."""
    url = f"etcd://{etcd.url}/away"
    job = digits_job(tmp_path, rounds=30, min_workers=2, epochs=4)
    flags = ("--membership", url, "--lease-ttl", str(TTL))
    coordinator = cluster.coordinator(job, extra=flags)
    for w in ("w0", "w1"):
        cluster.worker(w, *flags)
    cluster.wait_status("dg", lambda s: s["round"] >= 3, 60, "three rounds")
    assert etcd.proc is not None
    etcd.proc.send_signal(signal.SIGSTOP)
    log = tmp_path / "coordinator.log"
    wait_for(
        lambda: "no longer leading" in log.read_text(),
        3 * TTL + 5,
        "the leader to notice its lease is gone",
    )
    etcd.proc.send_signal(signal.SIGCONT)
    wait_for(
        lambda: log.read_text().count("leading cluster=away") == 2,
        30,
        "the coordinator to lead again",
    )
    done = cluster.wait_status("dg", lambda s: s["state"] == "finished", 180, "the job to finish")
    assert [h["round"] for h in done["history"]] == list(
        range(1, 31)
    )  # from the checkpoint on, each once
    assert [h["version"] for h in done["history"]] == list(range(1, 31))
    text = log.read_text()
    assert "standing by" in text and "resumed job=dg" in text, text
    assert coordinator.poll() is None  # the same process throughout
