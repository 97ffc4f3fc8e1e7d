"""Big updates are offered and sent one window at a time: the coordinator never
holds more than the window (or one update) of them at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import Cluster, write_job

pytestmark = pytest.mark.slow
PARAMS = 1_000_000  # 4 MB updates: above OFFER_MIN_BYTES, so every one is offered first


def test_updates_come_in_one_at_a_time_with_a_zero_window(cluster: Cluster, tmp_path: Path) -> None:
    job = write_job(tmp_path / "big.toml", f"""
[job]
id = "big"
task = "synthetic"
rule = "fedavg"
rounds = 5
min_workers = 4
max_workers = 4
eval_every = 0
[task]
params = {PARAMS}
[train]
lr = 0.001
""")
    cluster.coordinator(job, extra=("--upload-window", "0", "--log-level", "debug"))
    for i in range(4):
        cluster.worker(f"w{i}")
    done = cluster.wait_status("big", lambda s: s["state"] == "finished", 120, "the job to finish")
    assert [h["updates"] for h in done["history"]] == [4] * 5
    log = (tmp_path / "coordinator.log").read_text()
    grants = [(w, int(b), int(f)) for w, b, f in re.findall(r"upload granted worker=(\w+) key=\S+ bytes=(\d+) in_flight=(\d+)", log)]
    assert len(grants) == 20, grants  # every update was offered and granted
    assert all(b >= PARAMS * 4 and f == b for _, b, f in grants), grants  # never more than one in flight


def test_a_negative_window_is_refused_at_start(cluster: Cluster, tmp_path: Path) -> None:
    bad = cluster.spawn("bad", "coordinator", "--bind", cluster.address, "--upload-window", "-1")
    assert bad.wait(30) == 2
    assert "upload_window must be >= 0" in (tmp_path / "bad.log").read_text()
