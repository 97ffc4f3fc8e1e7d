"""Running a Flower app for a comparison: a deployment (``flower-superlink`` and one
``flower-supernode`` per client on loopback) or Flower's simulation engine (a
SuperLink in ``--simulation`` mode, its Ray backend running the simulated
SuperNodes), submitted with ``flwr run``. Flower lives in its own virtual
environment (``.venv-flower``, made on first use), so its pins never touch elastic's.

The app writes its figures to ``out-file`` (a run-config key every app here takes);
``run_flower`` returns them with the peak resident memory of every process the run
started (Flower's whole footprint: SuperLink, SuperNodes or Ray's workers).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.cluster import free_port, stop_processes

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-flower"
FLWR = "flwr[simulation]==1.41.0"
TORCH = "torch==2.13.0"  # the CPU build from the local wheels, as elastic's


def flower_env() -> Path:
    """Flower's own virtual environment (with torch and Ray), made on first use."""
    ready = VENV / ".fltorch-ready"
    if not ready.exists():
        print(f"installing {FLWR} and {TORCH} into {VENV} ...", flush=True)
        if not (VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [
                str(VENV / "bin" / "pip"),
                "install",
                "--quiet",
                "--disable-pip-version-check",
                FLWR,
                TORCH,
                "numpy",
            ],
            check=True,
        )
        ready.touch()
    return VENV / "bin"


def wait_listening(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def _pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0.0


class NewProcesses:
    """The processes started after this was made (sampled every 0.25 s): their peak
    total resident memory, and a way to end the ones that outlive the run (Ray's)."""

    def __init__(self) -> None:
        self.before = _pids() | {os.getpid()}
        self.peak_mb = 0.0
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            new = _pids() - self.before
            self.seen |= new
            self.peak_mb = max(self.peak_mb, sum(_rss_mb(p) for p in new))
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for pid in sorted(self.seen & _pids()):
            try:
                os.kill(pid, 9)
            except (ProcessLookupError, PermissionError):
                pass


def run_flower(
    app: Path,
    config: dict[str, Any],
    nodes: int,
    simulation: bool,
    cpus_per_client: int = 1,
    timeout: float = 1800.0,
    port: int | None = None,
) -> tuple[dict[str, Any], float]:
    """Run ``app`` with ``config`` on ``nodes`` clients, the SuperLink on ``port`` (else
    a free one); (its out-file, peak MB)."""
    bin_dir = flower_env()
    with tempfile.TemporaryDirectory(prefix="flower-") as tmp:
        root = Path(tmp)
        link = port or free_port()  # since flwr 1.41 one HTTP port serves Fleet and Control
        home = root / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = '
            f'"127.0.0.1:{link}"\ninsecure = true\n'
        )
        env = dict(
            os.environ,
            FLWR_HOME=str(home),
            PYTHONUNBUFFERED="1",
            PATH=f"{bin_dir}:{os.environ.get('PATH', '')}",
            RAY_DEDUP_LOGS="0",
        )  # Flower starts its own helpers by name
        procs: list[subprocess.Popen] = []
        watch = NewProcesses()

        def spawn(name: str, argv: list[str]) -> subprocess.Popen:
            with open(root / f"{name}.log", "ab") as out:
                p = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=root,
                )
            procs.append(p)
            return p

        out_file = root / "out.json"
        try:
            spawn(
                "superlink",
                [
                    str(bin_dir / "flower-superlink"),
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(link),
                    "--disable-runtime-dependency-installation",
                    *(["--simulation"] if simulation else []),
                ],
            )
            wait_listening(link)
            for i in range(0 if simulation else nodes):
                spawn(
                    f"supernode{i}",
                    [
                        str(bin_dir / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{link}",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        f"partition-id={i} num-partitions={nodes}",
                    ],
                )
            settings = {**config, "out-file": str(out_file), "nodes": nodes}
            run_config = " ".join(
                f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in settings.items()
            )
            federation = (
                [
                    "--federation-config",
                    f"num-supernodes={nodes} client-resources-num-cpus={cpus_per_client}",
                ]
                if simulation
                else []
            )
            run = spawn(
                "flwr-run",
                [
                    str(bin_dir / "flwr"),
                    "run",
                    str(app),
                    "bench",
                    "--run-config",
                    run_config,
                    *federation,
                    "--stream",
                ],
            )
            deadline = time.monotonic() + timeout
            while not out_file.exists():
                if time.monotonic() > deadline or (run.poll() is not None and run.returncode):
                    logs = "\n".join(
                        f"----- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                        for p in sorted(root.glob("*.log"))
                    )
                    raise RuntimeError(f"the Flower run did not finish\n{logs}")
                time.sleep(0.2)
            time.sleep(0.2)
            figures = json.loads(out_file.read_text())
        finally:
            stop_processes(procs, grace=15)
            watch.stop()
    return figures, watch.peak_mb
