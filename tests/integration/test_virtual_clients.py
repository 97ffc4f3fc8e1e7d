"""A thousand virtual clients on two worker processes: every client sampled trains on
its own partition, none twice in a round, every one over a pass; each client's update
reaches the coordinator on its own; and memory stays that of the model, not of the
clients."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from .conftest import Cluster, write_job

pytestmark = pytest.mark.slow
TASK = Path(__file__).parent / "tasks" / "probe_clients.py"


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_a_thousand_clients_on_two_workers(cluster: Cluster, tmp_path: Path) -> None:
    trained = tmp_path / "trained.log"
    job = write_job(
        tmp_path / "many.toml",
        f'[job]\nid = "many"\ntask = "{TASK}:ProbeClients"\nrule = "fedavg"\nrounds = 50\n'
        'min_workers = 2\nclients = 1000\nclients_per_round = 20\nclient_sampling = "cycle"\n'
        f'eval_every = 0\nround_timeout = 60\n[task]\nlog = "{trained}"\ndim = 500\n',
    )
    coordinator = cluster.coordinator(job)
    workers = [cluster.worker(w) for w in ("w0", "w1")]
    cluster.wait_status("many", lambda s: s["round"] >= 3, 90, "three rounds")
    settled = {p.pid: rss_kib(p.pid, "VmRSS") for p in (coordinator, *workers)}
    status = cluster.wait_status("many", lambda s: s["state"] == "finished", 240, "the job's end")
    peak = {p.pid: rss_kib(p.pid, "VmHWM") for p in (coordinator, *workers)}

    history = status["history"]
    assert [r["round"] for r in history] == list(range(1, 51))
    lines = [line.split() for line in trained.read_text().splitlines()]
    per_round: dict[int, list[int]] = {}
    for round_, client, data, _pid in lines:
        assert client == data, "a client trained on another client's data"
        per_round.setdefault(int(round_), []).append(int(client))
    for record in history:
        clients = per_round[record["round"]]
        assert len(clients) == len(set(clients)) == 20, "a client trained twice in a round"
        assert sorted(clients) == record["clients"]  # each client's update folded on its own
        assert record["updates"] == 20 and record["participants"] == 2
        assert record["train_client"] == pytest.approx(sum(clients) / 20)  # its own figures
    assert Counter(c for cs in per_round.values() for c in cs) == Counter(range(1000))
    assert len({pid for *_, pid in lines}) == 2  # both processes served clients

    # Each process holds about a model or two (1 MB here), not one per client it
    # served (500 each: 500 MB): its peak stays within 64 MB of where it settled.
    for pid, before in settled.items():
        assert peak[pid] - before < 64 * 1024, (pid, before, peak[pid])
    metrics = json.dumps(status["totals"])
    assert '"updates": 1000' in metrics
