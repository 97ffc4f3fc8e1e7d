"""Compressed updates between real processes: the coordinator decodes any chain from
the header alone, and the job still learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from .conftest import Cluster, write_job

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
