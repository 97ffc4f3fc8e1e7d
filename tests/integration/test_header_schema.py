"""What real daemons send is what the protocol declares: every meta key of every
message, recorded from a coordinator, two workers and the CLI at work, is in
``META_SCHEMA`` with the type it is declared with, and every key the schema
declares is used by some daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from elastic.wire.header import META_SCHEMA, MsgType
from tests.etcd_server import free_port

from .conftest import Cluster, big_job, wait_for, write_job

pytestmark = pytest.mark.slow

RECORDER = Path(__file__).parent / "recorder"
PROBE = Path(__file__).parent / "tasks" / "probe_clients.py"


def recorded(directory: Path) -> set[tuple[str, str, str]]:
    return {
        tuple(json.loads(line))
        for path in directory.glob("*.jsonl")
        for line in path.read_text().splitlines()
    }


def declared(kind: str, key: str, type_name: str) -> bool:
    expected = META_SCHEMA[MsgType(kind)].get(key)
    if expected is None:
        return False
    wanted = expected if isinstance(expected, tuple) else (expected,)
    return type_name in {t.__name__ for t in wanted} or (type_name == "int" and float in wanted)


def test_the_daemons_send_exactly_the_declared_meta_keys(cluster: Cluster, tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    cluster.env = {
        "ELASTIC_RECORD_HEADERS": str(records),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(RECORDER), os.environ.get("PYTHONPATH")])),
    }
    # Job "big": syncavg on 1M parameters. w0 shares this host's memory (it reads the
    # shared model); w1 does not, and sends its gradients in 1 MiB parts.
    big = big_job(tmp_path, rounds=3, min_workers=2)
    # Job "cz": both ways compressed; the model comes down as deltas; each update is
    # clipped on its worker (differential privacy).
    cz = write_job(
        tmp_path / "cz.toml",
        """
[job]
id = "cz"
task = "linreg"
rule = "fedavg"
rounds = 4
min_workers = 2
[task]
features = 8
[train]
local_epochs = 2
stragglers = 0.5
straggler_epochs = [1, 1]
[compression]
update = ["fp16"]
model = ["fp16"]
[privacy]
clip = 10.0
noise_multiplier = 0.01
delta = 0.1
clip_on = "worker"
""",
    )
    # Job "vc": virtual clients, a task with its own loop and figures of its own.
    vc = write_job(
        tmp_path / "vc.toml",
        f"""
[job]
id = "vc"
task = "{PROBE}:ProbeClients"
rule = "fedavg"
rounds = 2
min_workers = 2
clients = 10
clients_per_round = 4
eval_every = 0
[task]
log = "{tmp_path / "vc.log"}"
dim = 4
""",
    )
    # Job "ar": collective training (generations, reports, checkpoints).
    ar = write_job(
        tmp_path / "ar.toml",
        """
[job]
id = "ar"
task = "linreg"
rule = "allreduce"
rounds = 10
min_workers = 2
eval_every = 0
[train]
batch_size = 0
[rule]
checkpoint_every = 5
""",
    )
    # Job "sg": secure aggregation (EXCHANGE messages both ways), on three workers.
    sg = write_job(
        tmp_path / "sg.toml",
        """
[job]
id = "sg"
task = "linreg"
rule = "fedavg"
rounds = 2
min_workers = 3
max_workers = 3
eval_every = 0
[privacy]
mechanism = "secagg"
""",
    )
    control = f"tcp://127.0.0.1:{free_port()}"
    cluster.coordinator(
        big, cz, vc, ar, sg, extra=("--upload-part", "1048576", "--control", control)
    )
    workers = [
        cluster.worker("w0"),
        cluster.worker("w1", "--no-shared-memory"),
        cluster.worker("w2", "--no-shared-memory"),
    ]
    for job in ("big", "cz", "vc", "ar", "sg"):
        cluster.wait_status(job, lambda s: s["state"] == "finished", 120, f"job {job} to finish")
    ls = subprocess.run(
        [sys.executable, "-m", "elastic", "job", "ls", "--coordinator", control],
        env={**os.environ, **cluster.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ls.returncode == 0, ls.stderr
    for w in workers:  # a graceful leave: BYE, and its ACK
        w.send_signal(signal.SIGTERM)
        w.wait(30)
    wait_for(lambda: ("BYE", "", "") in recorded(records), 10, "a BYE")
    # (a worker serving both jobs sent cz's small updates between big's parts: they
    # once ended its stream, and the part after got bad_part)
    assert "reason=bad_part" not in (tmp_path / "w1.log").read_text()

    seen = recorded(records)
    undeclared = sorted(r for r in seen if r[1] and not declared(*r))
    assert not undeclared, (
        f"sent but not declared in META_SCHEMA (or with another type): {undeclared}"
    )
    sent_types = {kind for kind, _, _ in seen}
    assert sent_types >= {t.value for t in MsgType} - {"NACK"}, (
        f"message types never sent: {sorted({t.value for t in MsgType} - sent_types)}"
    )
    keys = {(kind, key) for kind, key, _ in seen if key}
    unused = sorted(
        (str(t), k)
        for t, fields in META_SCHEMA.items()
        for k in fields
        if (str(t), k) not in keys and t is not MsgType.NACK
    )
    assert not unused, f"declared but never sent by the daemons: {unused}"
