"""Prometheus metrics scraped from a coordinator during a job: the counters move."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from tests.etcd_server import free_port

from .conftest import Cluster, wait_for, write_job

pytestmark = pytest.mark.slow


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:  # not listening yet
        return 0, ""


def test_metrics_move_during_a_job(cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    job = write_job(
        tmp_path / "m.toml",
        """
[job]
id = "m"
task = "digits"
rule = "fedavg"
rounds = 1000
min_workers = 2
eval_every = 10
[train]
local_epochs = 3
[compression]
update = ["qsgd:4", "zstd"]
""",
    )
    cluster.coordinator(job, extra=("--metrics-port", str(port)))
    wait_for(lambda: get(port, "/healthz")[0] == 200, 30, "/healthz")
    for w in ("w0", "w1"):
        cluster.worker(w)
    cluster.wait_status("m", lambda s: s["round"] >= 3, 60, "three rounds")
    wait_for(
        lambda: scrape(port).get(("elastic_job_round", (("job", "m"),)), 0) >= 3,
        5,
        "the snapshot to catch up",
    )
    first = scrape(port)
    with (
        zmq.Context() as ctx,
        ctx.socket(zmq.DEALER) as rogue,
    ):  # a garbage message: counted, refused
        rogue.setsockopt(zmq.IDENTITY, b"rogue")
        rogue.connect(cluster.address)
        rogue.send(b"\xff not msgpack")
        wait_for(
            lambda: (
                scrape(port).get(
                    ("elastic_updates_rejected_total", (("reason", "malformed_header"),)), 0
                )
                >= 1
            ),
            10,
            "the rejection to be counted",
        )
        rogue.close(linger=0)
    cluster.wait_status(
        "m",
        lambda s: s["round"] >= first[("elastic_job_round", (("job", "m"),))] + 3,
        60,
        "three more rounds",
    )
    wait_for(
        lambda: (
            scrape(port)[("elastic_rounds_committed_total", (("job", "m"),))]
            > first[("elastic_rounds_committed_total", (("job", "m"),))]
        ),
        5,
        "committed rounds to move",
    )
    later = scrape(port)
    job_label = (("job", "m"),)
    for name in (
        "elastic_updates_accepted_total",
        "elastic_update_bytes_wire_total",
        "elastic_model_bytes_sent_total",
        "elastic_round_duration_seconds_count",
        "elastic_checkpoint_duration_seconds_count",
    ):
        assert later[(name, job_label)] > first[(name, job_label)], name
    assert (
        later[("elastic_socket_bytes_in_total", ())] > first[("elastic_socket_bytes_in_total", ())]
    )
    assert later[("elastic_members", (("device", "cpu"),))] == 2
    assert later[("elastic_update_compression_ratio", job_label)] > 4  # 4-bit levels, then zstd
    assert later[("elastic_job_state", (("job", "m"), ("state", "running")))] == 1
    assert later[("elastic_leader", ())] == 1
    assert get(port, "/readyz") == (200, "ok: serving\n")
