"""Soak: a job under random worker churn for a fixed time (default 10 minutes).

A coordinator and 4 workers on loopback (digits, FedAvg, min_workers 2, a checkpoint
every 5 rounds). Every few seconds one random worker is SIGKILLed and started again,
stopped with SIGTERM and started again, or frozen with SIGSTOP for 2 s. Reports:

* rounds completed, and whether their numbers run without a gap or a repeat;
* updates acknowledged (the coordinator folded them, and said so) in rounds that
  committed, against the updates those committed rounds count: lost must be 0;
* the coordinator's resident memory over time (first minute against last minute,
  and the peak): it must not grow with time.

    python benchmarks/soak.py [--seconds 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.plotting import line_chart  # noqa: E402
from tests.etcd_server import free_port  # noqa: E402

JOB = """
[job]
id = "soak"
task = "digits"
rule = "fedavg"
rounds = 1000000
min_workers = 2
partitions = 4
round_timeout = 10
eval_every = 50
[train]
local_epochs = 1
[checkpoint]
every = 5
keep = 2
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "job.toml").write_text(JOB)
        address = f"tcp://127.0.0.1:{free_port()}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", ELASTIC_INSECURE="1")  # loopback only

        def spawn(name: str, *cmd: str) -> subprocess.Popen:
            with open(root / f"{name}.log", "ab") as out:
                return subprocess.Popen(
                    [sys.executable, "-m", "elastic", *cmd],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )

        def worker(name: str) -> subprocess.Popen:
            return spawn(
                name,
                "worker",
                "--coordinator",
                address,
                "--id",
                name,
                "--device",
                "cpu",
                "--threads",
                "1",
                "--coordinator-timeout",
                "5",
            )

        coordinator = spawn(
            "coordinator",
            "coordinator",
            "--bind",
            address,
            "--control",
            f"tcp://127.0.0.1:{free_port()}",
            "--state-dir",
            str(root / "state"),
            "--job",
            str(root / "job.toml"),
            "--log-level",
            "debug",
            "--heartbeat-timeout",
            "3",
        )
        workers = {f"w{i}": worker(f"w{i}") for i in range(4)}
        samples: list[tuple[float, float]] = []
        actions = {"kill": 0, "term": 0, "stop": 0}
        started = time.monotonic()
        next_action = started + 5
        try:
            while (now := time.monotonic()) - started < args.seconds:
                samples.append((now - started, rss_mb(coordinator.pid)))
                if now >= next_action:
                    name = rng.choice(sorted(workers))
                    action = rng.choice(["kill", "term", "stop"])
                    actions[action] += 1
                    proc = workers[name]
                    if action == "stop":
                        proc.send_signal(signal.SIGSTOP)
                        time.sleep(2)
                        proc.send_signal(signal.SIGCONT)
                    else:
                        proc.send_signal(signal.SIGKILL if action == "kill" else signal.SIGTERM)
                        proc.wait(30)
                        workers[name] = worker(name)
                    next_action = time.monotonic() + rng.uniform(3, 8)
                time.sleep(1.0)
        finally:
            for proc in [*workers.values(), coordinator]:
                proc.send_signal(signal.SIGTERM)
            for proc in [*workers.values(), coordinator]:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        log = (root / "coordinator.log").read_text()
    # Every commit from the log: the status keeps the newest rounds whole and thins
    # older ones (elastic.coordinator.job.HISTORY_RECENT), and a soak runs thousands.
    rounds: list[int] = []
    committed: dict[int, int] = {}
    folded: dict[int, int] = {}
    for line in log.splitlines():
        if "round committed job=soak" in line:
            n = int(re.search(r"round=(\d+)", line).group(1))  # type: ignore[union-attr]
            rounds.append(n)
            committed[n] = int(re.search(r"updates=(\d+)", line).group(1))  # type: ignore[union-attr]
        elif "round started job=soak" in line:
            n = int(re.search(r"round=(\d+)", line).group(1))  # type: ignore[union-attr]
            folded[n] = 0  # a re-run starts counting again
        elif "update folded job=soak" in line:
            n = int(re.search(r"round=(\d+)", line).group(1))  # type: ignore[union-attr]
            folded[n] = folded.get(n, 0) + 1
    acknowledged = sum(folded.get(n, 0) for n in committed)
    counted = sum(committed.values())
    minute = [m for t, m in samples if t <= 60]
    last = [m for t, m in samples if t >= samples[-1][0] - 60]
    first_mb, last_mb = sum(minute) / len(minute), sum(last) / len(last)
    # The first minute's mean includes the start (Python, torch, the job being built):
    # growth is told by the RSS once the first rounds ran, against the end.
    settled = next((m for t, m in samples if t >= 30), samples[-1][1])
    print(f"soak: {args.seconds:.0f} s, 4 workers, churn actions {actions} (seed {args.seed})")
    print(
        f"rounds completed: {len(rounds)} ({len(rounds) / args.seconds * 60:.0f}/min); numbered "
        f"1..{rounds[-1]} without gap or repeat: {rounds == list(range(1, len(rounds) + 1))}"
    )
    print(
        f"updates acknowledged in committed rounds: {acknowledged}; counted by those rounds: "
        f"{counted}; lost: {acknowledged - counted}"
    )
    print(
        f"coordinator RSS: first minute {first_mb:.0f} MB, last minute {last_mb:.0f} MB "
        f"(x{last_mb / first_mb:.2f}), peak {max(m for _, m in samples):.0f} MB"
    )
    print(
        f"coordinator RSS at 30 s {settled:.0f} MB, at the end {samples[-1][1]:.0f} MB: "
        f"{samples[-1][1] - settled:+.0f} MB over {len(rounds)} rounds"
    )
    line_chart(
        "soak",
        f"coordinator RSS under worker churn ({args.seconds:.0f} s)",
        "seconds",
        "RSS (MB)",
        {"coordinator": ([t for t, _ in samples], [m for _, m in samples])},
    )


if __name__ == "__main__":
    main()
