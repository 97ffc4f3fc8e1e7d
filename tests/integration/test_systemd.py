"""The systemd units verify, and the daemons speak the notify protocol themselves:
READY, WATCHDOG, STATUS, RELOADING on SIGHUP, STOPPING on SIGTERM."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import Cluster, wait_for, write_job

pytestmark = pytest.mark.slow
UNITS = Path(__file__).parents[2] / "deploy" / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize(
    "unit, as_name",
    [
        ("elastic-coordinator.service", "elastic-coordinator.service"),
        ("elastic-worker@.service", "elastic-worker@0.service"),
    ],
)
def test_units_verify(tmp_path: Path, unit: str, as_name: str) -> None:
    # verify checks that ExecStart exists: point it at this environment's elastic
    binary = Path(sys.executable).parent / "elastic"
    text = (UNITS / unit).read_text().replace("/usr/local/bin/elastic", str(binary))
    (tmp_path / as_name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / as_name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr  # not even a warning


class NotifySocket:
    """The datagram socket systemd would give a service, bound by the test and read
    all the time, as systemd reads it (its queue holds only 10 datagrams)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                lines = self.sock.recv(4096).decode().splitlines()
            except TimeoutError:
                continue
            with self._lock:
                self.lines += lines

    def read(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def close(self) -> None:
        self._closed.set()

    def saw(self, line: str) -> bool:
        return any(
            x == line or (line.endswith("*") and x.startswith(line[:-1])) for x in self.read()
        )

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": "400000"}


def test_daemons_notify_systemd(cluster: Cluster, tmp_path: Path) -> None:
    job = write_job(
        tmp_path / "lin.toml",
        '[job]\nid = "lin"\ntask = "linreg"\nrule = "fedavg"\nrounds = 400\nmin_workers = '
        "1\neval_every = 0\n[train]\nlocal_epochs = 20\n",
    )
    config = tmp_path / "coordinator.toml"
    config.write_text('[coordinator]\nlog_level = "info"\n')
    coordinator_notify, worker_notify = (
        NotifySocket(tmp_path / "c.sock"),
        NotifySocket(tmp_path / "w.sock"),
    )
    coordinator = cluster.spawn(
        "coordinator",
        "coordinator",
        "--config",
        str(config),
        "--bind",
        cluster.address,
        "--state-dir",
        str(cluster.state),
        "--job",
        str(job),
        env=coordinator_notify.env(),
    )
    worker = cluster.spawn(
        "w0",
        "worker",
        "--coordinator",
        cluster.address,
        "--id",
        "w0",
        "--device",
        "cpu",
        "--threads",
        "1",
        env=worker_notify.env(),
    )
    for notify in (coordinator_notify, worker_notify):
        wait_for(lambda n=notify: n.saw("READY=1"), 30, "READY=1")
        wait_for(
            lambda n=notify: n.read().count("WATCHDOG=1") >= 3,
            10,
            "the watchdog petted from the main loop",
        )
    wait_for(
        lambda: coordinator_notify.saw("STATUS=1 workers; lin running round *"),
        30,
        "a status line with the round",
    )
    assert worker_notify.saw("STATUS=joined tcp://127.0.0.1:*")

    config.write_text('[coordinator]\nlog_level = "debug"\nheartbeat_timeout = 20\n')
    before = len(coordinator_notify.read())
    coordinator.send_signal(signal.SIGHUP)
    wait_for(lambda: "RELOADING=1" in coordinator_notify.read()[before:], 10, "RELOADING=1")
    wait_for(
        lambda: "READY=1" in coordinator_notify.read()[before:], 10, "READY=1 after the reload"
    )
    log = tmp_path / "coordinator.log"
    wait_for(
        lambda: "configuration reloaded applied=heartbeat_timeout,log_level" in log.read_text(),
        10,
        "the reload to apply",
    )
    wait_for(
        lambda: "level=debug logger=elastic.rounds msg='update folded" in log.read_text(),
        10,
        "debug lines after the reload",
    )

    for proc, notify in ((worker, worker_notify), (coordinator, coordinator_notify)):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert notify.saw("STOPPING=1")
        notify.close()
