"""Every ``elastic job`` command and ``elastic members`` against running daemons."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch

from tests.etcd_server import EtcdServer, free_port

from .conftest import Cluster, wait_for, write_job

pytestmark = pytest.mark.slow


def elastic(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "elastic", *args], capture_output=True, text=True, timeout=timeout
    )


def as_json(*args: str) -> dict | list:
    done = elastic(*args, "--output", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def lin_job(tmp_path: Path, job_id: str, rounds: int) -> Path:
    return write_job(
        tmp_path / f"{job_id}.toml",
        f'[job]\nid = "{job_id}"\ntask = "linreg"\nrule = "fedavg"\nrounds = '
        f"{rounds}\nmin_workers = 1\neval_every = 0\n[train]\nlocal_epochs = "
        "30\n[checkpoint]\nevery = 5\n",
    )


def test_every_command(cluster: Cluster, tmp_path: Path) -> None:
    control = f"tcp://127.0.0.1:{free_port()}"
    cluster.coordinator(extra=("--control", control))
    cluster.worker("w0")
    at = ("--coordinator", control)
    wait_for(lambda: len(as_json("members", *at)) == 1, 30, "the worker to join")
    assert as_json("job", "ls", *at) == []

    done = elastic("job", "submit", str(lin_job(tmp_path, "lin", 400)), *at)
    assert done.returncode == 0 and "submitted job lin" in done.stdout, done.stderr
    wait_for(lambda: as_json("job", "status", "lin", *at)["round"] >= 5, 60, "five rounds")
    [listed] = as_json("job", "ls", *at)
    assert (listed["job"], listed["rule"], listed["state"], listed["members"]) == (
        "lin",
        "fedavg",
        "running",
        1,
    )
    table = elastic("job", "ls", *at)
    assert table.returncode == 0 and "lin" in table.stdout and "running" in table.stdout

    assert as_json("job", "pause", "lin", *at)["desired"] == "paused"
    paused = wait_for(
        lambda: (s := as_json("job", "status", "lin", *at))["state"] == "paused" and s,
        30,
        "the job to pause",
    )
    assert (
        as_json("job", "status", "lin", *at)["round"] == paused["round"]
    )  # nothing runs while paused
    assert elastic("job", "resume", "lin", *at).returncode == 0
    wait_for(
        lambda: as_json("job", "status", "lin", *at)["round"] >= paused["round"] + 3,
        30,
        "rounds after resuming",
    )

    out = tmp_path / "model.safetensors"
    exported = as_json("job", "export", "lin", "--out", str(out), *at)
    assert (
        set(safetensors.torch.load_file(out)) == {"weight", "bias"}
        and exported["round"] >= paused["round"]
    )

    logs = elastic("job", "logs", "lin", *at)
    rounds = [int(line.split()[0].removeprefix("round=")) for line in logs.stdout.splitlines()]
    assert (
        rounds == list(range(1, len(rounds) + 1)) and len(rounds) > paused["round"]
    )  # none lost, none twice

    cancelled = as_json("job", "cancel", "lin", *at)
    assert cancelled["desired"] == "cancelled"
    assert as_json("job", "status", "lin", *at)["state"] == "cancelled"
    again = elastic("job", "cancel", "lin", *at)
    assert again.returncode == 1 and "is cancelled" in again.stderr
    assert list((cluster.state / "lin").glob("ckpt-*.pt"))  # its last checkpoint stays

    follow = elastic("job", "submit", str(lin_job(tmp_path, "short", 10)), "--follow", *at)
    assert follow.returncode == 0 and "job short: finished at round 10/10" in follow.stderr, (
        follow.stderr
    )
    followed = elastic("job", "logs", "short", "--follow", "--output", "json", *at)
    assert [json.loads(line)["round"] for line in followed.stdout.splitlines()] == list(
        range(1, 11)
    )

    elastic("job", "submit", str(lin_job(tmp_path, "long", 100000)), *at)
    wait_for(lambda: as_json("job", "status", "long", *at)["round"] >= 3, 60, "three rounds")
    assert as_json("job", "finish", "long", *at)["desired"] == "finished"
    long = wait_for(
        lambda: (s := as_json("job", "status", "long", *at))["state"] == "finished" and s,
        30,
        "the job to finish",
    )
    assert 3 <= long["round"] < 100000 and (cluster.state / "long" / "final.safetensors").exists()
    logs = elastic("job", "logs", "long", "--output", "json", *at)
    assert [json.loads(line)["round"] for line in logs.stdout.splitlines()] == list(
        range(1, long["round"] + 1)
    )

    missing = elastic("job", "status", "nope", *at)
    assert (
        missing.returncode == 4
        and missing.stderr.strip() == "elastic: error: no job 'nope' here (jobs: lin, long, short)"
    )
    bad = write_job(tmp_path / "bad.toml", '[job]\nid = "bad"\ntask = "linreg"\nrule = "fedavgg"\n')
    refused = elastic("job", "submit", str(bad), *at)
    assert refused.returncode == 2 and "unknown aggregator 'fedavgg'" in refused.stderr
    twice = elastic("job", "submit", str(tmp_path / "lin.toml"), *at)
    assert twice.returncode == 1 and "exists already" in twice.stderr
    nobody = elastic(
        "job", "ls", "--coordinator", f"tcp://127.0.0.1:{free_port()}", "--timeout", "1"
    )
    assert (
        nobody.returncode == 3
        and nobody.stderr.count("\n") == 1
        and "no coordinator reachable at" in nobody.stderr
    )


def test_the_cli_finds_the_leader_in_etcd(
    cluster: Cluster, tmp_path: Path, etcd: EtcdServer
) -> None:
    url = f"etcd://{etcd.url}/cli"
    cluster.coordinator(
        lin_job(tmp_path, "lin", 100000),
        extra=("--membership", url, "--control", f"tcp://127.0.0.1:{free_port()}"),
    )
    cluster.worker("w0", "--membership", url)
    wait_for(
        lambda: elastic("job", "ls", "--membership", url).returncode == 0,
        30,
        "the leader to answer",
    )
    wait_for(
        lambda: as_json("job", "status", "lin", "--membership", url)["round"] >= 2, 60, "two rounds"
    )
    assert as_json("job", "pause", "lin", "--membership", url)["desired"] == "paused"
    from elastic.membership.etcd.client import Keys, connect

    client = connect(url)
    try:
        assert (
            client.get(Keys("cli").job("lin", "state"))[0] == b"paused"
        )  # a next leader would keep it
        assert as_json("job", "finish", "lin", "--membership", url)["desired"] == "finished"
        assert client.get(Keys("cli").job("lin", "state"))[0] == b"finished"
    finally:
        client.close()
    finished = wait_for(
        lambda: (
            (s := as_json("job", "status", "lin", "--membership", url))["state"] == "finished" and s
        ),
        30,
        "the paused job to finish",
    )
    assert (
        finished["round"] < finished["rounds"]
        and (cluster.state / "lin" / "final.safetensors").exists()
    )
