"""The ``async`` rule with real processes: a worker 5x slower than the others never
holds anyone up, its stale updates are refused, and the job still learns."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests.etcd_server import EtcdServer
from tests.throttle import Throttle

from .conftest import Cluster, write_job

pytestmark = pytest.mark.slow
MAX_STALENESS = 3


def async_job(tmp_path: Path, versions: int, extra_rule: str = "", epochs: int = 1) -> Path:
    return write_job(
        tmp_path / "as.toml",
        f"""
[job]
id = "as"
task = "digits"
rule = "async"
rounds = {versions}
min_workers = 1
partitions = 4
round_timeout = 60
eval_every = 10
[task]
alpha = 100.0
[train]
local_epochs = {epochs}
batch_size = 32
lr = 0.05
momentum = 0.9
[rule]
{extra_rule}
[checkpoint]
every = 10
""",
    )


def test_a_5x_straggler_never_applies_a_stale_update(cluster: Cluster, tmp_path: Path) -> None:
    job = async_job(
        tmp_path,
        300,
        extra_rule=f"max_staleness = {MAX_STALENESS}\nbuffer = 1\nmixing = 0.3\nstaleness = "
        '"polynomial"',
    )
    cluster.coordinator(job)
    slow = cluster.worker("slow")
    # It loads the job and warms up at full speed (as a slow machine would have done
    # long before), then runs at a fifth of the speed while the fast workers join.
    cluster.wait_status("as", lambda s: s["round"] >= 3, 60, "the slow worker's first versions")
    with Throttle(slow.pid, 5):
        for w in ("w1", "w2", "w3"):
            cluster.worker(w)
        done = cluster.wait_status(
            "as", lambda s: s["state"] == "finished", 240, "the async job to finish"
        )
    history, totals = done["history"], done["totals"]
    assert [h["round"] for h in history] == list(range(1, 301))
    assert [h["version"] for h in history] == list(
        range(1, 301)
    )  # one version per commit, none twice
    assert max(h["staleness_max"] for h in history) <= MAX_STALENESS
    assert max(int(t) for t in totals["staleness_histogram"]) <= MAX_STALENESS
    assert totals["updates"] == sum(
        h["updates"] for h in history
    )  # every applied update in exactly one version
    assert totals["rejected_stale"] >= 1, totals
    slow_log = (tmp_path / "slow.log").read_text()
    assert "reason=too_stale" in slow_log
    # A refused worker is sent the current model and trains again: a second refusal
    # means it came back for more work after the first.
    assert slow_log.count("reason=too_stale") >= 2, slow_log
    assert done["final"]["accuracy"] >= 0.90, done["final"]
    assert done["async"]["versions_per_second"] > 0 and done["async"]["buffered"] == 0


def test_members_come_and_go_through_etcd(
    cluster: Cluster, tmp_path: Path, etcd: EtcdServer
) -> None:
    flags = ("--membership", f"etcd://{etcd.url}/as", "--lease-ttl", "3")
    job = async_job(tmp_path, 600, extra_rule="max_staleness = 4\nmixing = 0.3", epochs=4)
    cluster.coordinator(job, extra=flags)
    workers = {w: cluster.worker(w, *flags) for w in ("w0", "w1", "w2")}
    cluster.wait_status("as", lambda s: s["round"] >= 10, 60, "ten versions")
    workers["w0"].send_signal(signal.SIGTERM)  # leaves at once
    workers["w1"].send_signal(signal.SIGKILL)  # noticed when its lease ends
    joiner = cluster.worker("w3", *flags)
    cluster.wait_status(
        "as", lambda s: "w3" in s.get("async", {}).get("assigned", []), 60, "w3 to get work"
    )
    done = cluster.wait_status("as", lambda s: s["state"] == "finished", 180, "the job to finish")
    assert [h["round"] for h in done["history"]] == list(range(1, 601))
    assert max(int(t) for t in done["totals"]["staleness_histogram"]) <= 4
    log = (tmp_path / "coordinator.log").read_text()
    assert (
        "worker left worker=w0" in log
        and "worker left worker=w1" in log
        and "worker joined worker=w3" in log
    )
    joiner.send_signal(signal.SIGTERM)
    assert joiner.wait(30) == 0
    applied = re.search(r"worker stopped worker=w3 rounds=(\d+)", (tmp_path / "w3.log").read_text())
    assert applied and int(applied.group(1)) >= 1  # its updates were taken in
