"""Real daemons for benchmarks: a coordinator and N workers on loopback, one job.

Each daemon is the ``elastic`` command in a process of its own, as a user would run
it; the figures come from the job's status (per-round ``seconds`` and the slowest
participant's ``train_seconds_max``) and from ``/proc`` (resident memory).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def synthetic_job(
    job_id: str,
    rule: str,
    rounds: int,
    params: int,
    workers: int | None = None,
    rule_table: str = "",
    extra: str = "",
) -> str:
    """A job spec on the ``synthetic`` task: no evaluation but the last, no checkpoint
    but the last, ``workers`` exactly (else at least one), one small SGD step a round."""
    count = f"min_workers = {workers}\nmax_workers = {workers}" if workers else "min_workers = 1"
    return f"""
[job]
id = "{job_id}"
task = "synthetic"
rule = "{rule}"
rounds = {rounds}
{count}
eval_every = 0
round_timeout = 600
[task]
params = {params}
samples = 8
[train]
batch_size = 8
lr = 0.001
[rule]
{rule_table}
[checkpoint]
every = 1000000
{extra}"""


def stop_processes(procs: list[subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM every process still running, then SIGKILL whatever outlives ``grace``."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()


@dataclass
class Run:
    """What one job left: its final status and the coordinator's memory over time."""

    status: dict[str, Any]
    rss_samples: list[float] = field(default_factory=list)
    wall: float = 0.0
    cpu_samples: list[tuple[float, float]] = field(
        default_factory=list
    )  # (time.time(), coordinator CPU seconds)
    total_rss_samples: list[float] = field(default_factory=list)  # every daemon's, summed

    def cpu_between(self, start: float, end: float) -> float:
        """The coordinator's CPU seconds between two wall-clock times (sampled every 50 ms)."""
        inside = [c for t, c in self.cpu_samples if start <= t <= end]
        return inside[-1] - inside[0] if len(inside) > 1 else 0.0

    def rounds(self, skip: int = 0) -> list[dict[str, Any]]:
        """The round history after ``skip`` warm-up rounds."""
        return self.status["history"][skip:]

    @property
    def peak_rss_mb(self) -> float:
        return max(self.rss_samples, default=0.0)

    @property
    def peak_total_rss_mb(self) -> float:
        """The coordinator's and the workers' resident memory together, at its peak."""
        return max(self.total_rss_samples, default=0.0)


def run_job(
    job_toml: str,
    workers: int,
    timeout: float = 600.0,
    coordinator_args: tuple[str, ...] = (),
    worker_args: tuple[str, ...] = (),
    threads: int = 1,
    light: int = 0,
    light_delay: float = 0.0,
    light_procs: int = 1,
    port: int | None = None,
) -> Run:
    """Run ``job_toml`` on a fresh coordinator (bound to ``port``, else a free one),
    ``workers`` worker daemons and ``light`` light workers
    (``benchmarks/light_workers.py``, shared among ``light_procs`` processes); return
    when it finished."""
    with tempfile.TemporaryDirectory(prefix="elastic-bench-") as tmp:
        root = Path(tmp)
        (root / "job.toml").write_text(job_toml)
        port = port or free_port()
        address = f"tcp://127.0.0.1:{port}"
        env = dict(
            os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(Path(__file__).resolve().parents[1])
        )
        base = [sys.executable, "-m", "elastic"]
        procs: list[subprocess.Popen] = []

        def spawn(name: str, argv: list[str]) -> subprocess.Popen:
            with open(root / f"{name}.log", "ab") as out:
                p = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
                )
            procs.append(p)
            return p

        coordinator = spawn(
            "coordinator",
            [
                *base,
                "coordinator",
                "--bind",
                address,
                "--control",
                f"tcp://127.0.0.1:{free_port()}",
                "--state-dir",
                str(root / "state"),
                "--job",
                str(root / "job.toml"),
                "--exit-when-done",
                "--insecure",
                "--log-level",
                "warning",
                *coordinator_args,
            ],
        )
        for i in range(workers):
            spawn(
                f"w{i}",
                [
                    *base,
                    "worker",
                    "--coordinator",
                    address,
                    "--id",
                    f"w{i}",
                    "--device",
                    "cpu",
                    "--threads",
                    str(threads),
                    "--insecure",
                    "--log-level",
                    "warning",
                    "--coordinator-timeout",
                    "60",
                    *worker_args,
                ],
            )
        for i in range(light_procs if light else 0):
            count = light // light_procs + (i < light % light_procs)
            spawn(
                f"light{i}",
                [
                    sys.executable,
                    "-m",
                    "benchmarks.light_workers",
                    "--coordinator",
                    address,
                    "--count",
                    str(count),
                    "--prefix",
                    f"light{i}-",
                    "--delay",
                    str(light_delay),
                ],
            )
        samples: list[float] = []
        totals: list[float] = []
        cpu: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(rss_mb(coordinator.pid))
                totals.append(sum(rss_mb(p.pid) for p in procs))
                cpu.append((time.time(), cpu_seconds(coordinator.pid)))
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        try:
            coordinator.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                "the job did not finish in "
                f"{timeout:.0f}s:\n{(root / 'coordinator.log').read_text()[-3000:]}"
            ) from None
        finally:
            wall = time.monotonic() - started
            stop.set()
            sampler.join()
            stop_processes(procs)
        status_file = next((root / "state").glob("*/status.json"), None)
        if coordinator.returncode != 0 or status_file is None:
            raise RuntimeError(
                "the coordinator exited with "
                f"{coordinator.returncode}:\n{(root / 'coordinator.log').read_text()[-3000:]}"
            )
        return Run(json.loads(status_file.read_text()), samples, wall, cpu, totals)
