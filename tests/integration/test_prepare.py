"""Workers build their jobs' tasks and data when they join, before their first
round: the round does not wait for the build, and a worker still building gets no
work."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Cluster, write_job

pytestmark = pytest.mark.slow
TASK = Path(__file__).parent / "tasks" / "slow_build.py"


def test_the_first_round_does_not_wait_for_the_build(cluster: Cluster, tmp_path: Path) -> None:
    job = write_job(
        tmp_path / "slow.toml",
        f'[job]\nid = "slow"\ntask = "{TASK}:SlowBuild"\nrule = "fedavg"\nrounds = 3\n'
        "min_workers = 2\neval_every = 0\n[task]\nload_seconds = 6.0\n",
    )
    cluster.coordinator(job)
    for wid in ("w0", "w1"):
        cluster.worker(wid)
    status = cluster.wait_status("slow", lambda s: s["state"] == "finished", 90, "the job's end")
    first = status["history"][0]
    assert first["updates"] == 2 and first["seconds"] < 4.0, first  # the 6 s build came before
    coordinator = (tmp_path / "coordinator.log").read_text()
    assert coordinator.count("worker prepared worker=") == 2, cluster.dump_logs()
    for wid in ("w0", "w1"):
        assert "job prepared job=slow" in (tmp_path / f"{wid}.log").read_text()
