"""Real processes on loopback: start daemons, watch their status files, kill them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_status(state_dir: Path, job: str) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / job / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Cluster:
    """Starts `python -m elastic ...` processes; every one is killed at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.state = root / "state"
        self.env: dict[str, str] = {}  # for every process spawned

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        # Plaintext unless a test brings keys (the CURVE tests do): the daemons
        # refuse to start without one or the other.
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "ELASTIC_INSECURE": "1",
            **self.env,
            **(env or {}),
        }
        if (
            args
            and args[0] == "coordinator"
            and "--control" not in args
            and any(a.startswith("--bind") for a in args)
        ):
            # The default control port is the bind port + 1: with a random bind port,
            # that one may be taken. Tests give it a free port of its own.
            args = (*args, "--control", f"tcp://127.0.0.1:{free_port()}")
        with open(log, "ab") as out:
            p = subprocess.Popen(
                [sys.executable, "-m", "elastic", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.procs.append(p)
        self.logs[p.pid] = log
        return p

    def coordinator(
        self, *jobs: Path, name: str = "coordinator", extra: tuple[str, ...] = ()
    ) -> subprocess.Popen:
        args = [
            "coordinator",
            "--bind",
            self.address,
            "--state-dir",
            str(self.state),
            "--heartbeat-interval",
            "0.3",
            "--heartbeat-timeout",
            "1.5",
            *extra,
        ]
        for job in jobs:
            args += ["--job", str(job)]
        return self.spawn(name, *args)

    def worker(self, wid: str, *extra: str) -> subprocess.Popen:
        return self.spawn(
            wid,
            "worker",
            "--coordinator",
            self.address,
            "--id",
            wid,
            "--device",
            "cpu",
            "--threads",
            "1",
            "--coordinator-timeout",
            "5",
            *extra,
        )

    def status(self, job: str) -> dict[str, Any] | None:
        return read_status(self.state, job)

    def wait_status(
        self, job: str, check: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            st = self.status(job)
            return st if st is not None and check(st) else None

        try:
            return wait_for(probe, timeout, what)
        except AssertionError:
            raise AssertionError(
                f"{what}: timed out; last status {self.status(job)}\n{self.dump_logs()}"
            ) from None

    def dump_logs(self) -> str:
        out = []
        for log in self.logs.values():
            text = log.read_text(errors="replace") if log.exists() else ""
            out.append(f"----- {log.name}\n{text[-3000:]}")
        return "\n".join(out)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.stop_all()


def write_job(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def big_job(
    tmp_path: Path, rounds: int = 3, min_workers: int = 2, rule: str = "syncavg", extra: str = ""
) -> Path:
    """A job on 1M parameters: 4 MB a message, over the 1 MiB where offers and the
    shared-memory path start. Written to ``tmp_path/big.toml``."""
    return write_job(
        tmp_path / "big.toml",
        f"""
[job]
id = "big"
task = "synthetic"
rule = "{rule}"
rounds = {rounds}
min_workers = {min_workers}
max_workers = 2
eval_every = 0
seed = 3
[task]
params = 1000000
samples = 8
[train]
batch_size = 8
[rule]
{"lr = 0.01" if rule == "syncavg" else ""}
[checkpoint]
every = 1000
{extra}""",
    )
