"""A straggler past the round deadline does not stall the round; its late update is refused."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from .conftest import Cluster, wait_for, write_job

pytestmark = pytest.mark.slow

ROUND_TIMEOUT = 2.0


def test_frozen_worker_is_left_behind_and_told_it_was_late(
    cluster: Cluster, tmp_path: Path
) -> None:
    job = write_job(
        tmp_path / "dg.toml",
        f"""
[job]
id = "dg"
task = "digits"
rule = "fedavg"
rounds = 8
min_workers = 2
partitions = 3
round_timeout = {ROUND_TIMEOUT}
[train]
local_epochs = 20
lr = 0.05
momentum = 0.9
""",
    )
    # heartbeats may stay silent for 20 s: a frozen worker is slow, not dead
    cluster.coordinator(job, extra=("--heartbeat-timeout", "20"))
    slow = cluster.worker("slow")
    cluster.worker("w1")
    cluster.worker("w2")

    def slow_is_training(s: dict) -> bool:
        p = s.get("in_progress")
        return bool(p) and "slow" in p["participants"] and "slow" not in p["answered"]

    st = cluster.wait_status("dg", slow_is_training, 60, "a round with the slow worker training")
    frozen_round = st["in_progress"]["round"]
    slow.send_signal(signal.SIGSTOP)
    try:
        cluster.wait_status(
            "dg",
            lambda s: s["round"] >= frozen_round,
            ROUND_TIMEOUT + 20,
            "the round to commit without the frozen worker",
        )
    finally:
        time.sleep(0.5)
        slow.send_signal(signal.SIGCONT)
    done = cluster.wait_status("dg", lambda s: s["state"] == "finished", 120, "the job to finish")
    hit = next(h for h in done["history"] if h["round"] == frozen_round)
    assert hit["asked"] == 3 and hit["updates"] == 2
    assert hit["seconds"] < ROUND_TIMEOUT + 1.0, hit  # it waited for the deadline, no longer
    assert [h["round"] for h in done["history"]] == list(range(1, 9))
    log = tmp_path / "slow.log"
    wait_for(lambda: "reason=late" in log.read_text(), 20, "the late update to be refused")
    assert f"round={frozen_round} reason=late" in log.read_text()
    assert "round deadline passed" in (tmp_path / "coordinator.log").read_text()
