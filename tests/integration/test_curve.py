"""CURVE on the data path and the control API: only allowed keys get in, and what
travels is ciphertext (checked on bytes captured between a worker and the
coordinator, with the same check finding the tensors in a plaintext run)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from elastic_plugins.tasks.linreg import LinReg

from tests.etcd_server import free_port

from .conftest import Cluster, wait_for, write_job

pytestmark = pytest.mark.slow
TASK = {"samples": 200, "features": 64}


class Tap:
    """A TCP relay that keeps a copy of every byte it relays, both ways."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.captured = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # not listening yet: the worker reconnects
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    self.captured += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def saw(self, pattern: bytes) -> bool:
        with self._lock:
            return pattern in self.captured

    def close(self) -> None:
        self.server.close()


def keys(tmp_path: Path, *names: str) -> None:
    for name in names:
        where, _, key = name.rpartition("/")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "elastic",
                "keys",
                "generate",
                key,
                "--out",
                str(tmp_path / "keys" / where),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and "keep it here" in done.stdout, done.stderr


def model_bytes() -> bytes:
    """64 bytes of the weights the coordinator starts with (seed 0): what WORK carries."""
    return LinReg(TASK).build_model(0).weight.detach().numpy().tobytes()[:64]


def job(tmp_path: Path) -> Path:
    return write_job(
        tmp_path / "lin.toml",
        '[job]\nid = "lin"\ntask = "linreg"\nrule = "fedavg"\nrounds = 100000\nmin_workers = '
        f"1\neval_every = 0\n[task]\nsamples = {TASK['samples']}\nfeatures = {TASK['features']}\n",
    )


@pytest.mark.parametrize("secure", [True, False])
def test_curve_admits_only_allowed_keys_and_encrypts(
    cluster: Cluster, tmp_path: Path, secure: bool
) -> None:
    k = tmp_path / "keys"
    control = f"tcp://127.0.0.1:{free_port()}"
    metrics = free_port()
    if secure:
        keys(tmp_path, "coordinator", "workers/good", "admins/alice", "outsiders/mallory")
        flags: tuple[str, ...] = (
            "--curve-key",
            str(k / "coordinator.key_secret"),
            "--allow-workers",
            str(k / "workers"),
            "--allow-admins",
            str(k / "admins"),
        )
        env = {"ELASTIC_INSECURE": ""}
    else:
        flags, env = (), {}
    cluster.spawn(
        "coordinator",
        "coordinator",
        "--bind",
        cluster.address,
        "--control",
        control,
        "--state-dir",
        str(cluster.state),
        "--job",
        str(job(tmp_path)),
        "--metrics-port",
        str(metrics),
        *flags,
        env=env,
    )
    tap = Tap(cluster.port)
    try:
        worker_flags = (
            (
                "--curve-key",
                str(k / "workers" / "good.key_secret"),
                "--coordinator-key",
                str(k / "coordinator.key"),
            )
            if secure
            else ()
        )
        cluster.spawn(
            "good",
            "worker",
            "--coordinator",
            f"tcp://127.0.0.1:{tap.port}",
            "--id",
            "good",
            "--device",
            "cpu",
            "--threads",
            "1",
            *worker_flags,
            env=env,
        )
        cluster.wait_status("lin", lambda s: s["round"] >= 3, 60, "rounds with the allowed worker")
        log = tmp_path / "coordinator.log"
        if not secure:  # the check below is real: in plaintext it finds the model
            assert tap.saw(model_bytes()) or tap.saw(b"linreg")
            return
        assert (
            not tap.saw(model_bytes()) and not tap.saw(b"linreg") and not tap.saw(b"good")
        )  # tensors, headers, ids: all ciphertext

        # a stranger's key, and a plaintext worker: neither gets in
        cluster.spawn(
            "mallory",
            "worker",
            "--id",
            "mallory",
            "--coordinator",
            cluster.address,
            "--device",
            "cpu",
            "--curve-key",
            str(k / "outsiders" / "mallory.key_secret"),
            "--coordinator-key",
            str(k / "coordinator.key"),
            env=env,
        )
        cluster.spawn(
            "plain",
            "worker",
            "--id",
            "plain",
            "--coordinator",
            cluster.address,
            "--device",
            "cpu",
            "--insecure",
        )
        wait_for(
            lambda: "connection refused domain=data reason=unknown_key" in log.read_text(),
            30,
            "the unknown key to be refused",
        )
        time.sleep(3)
        text = log.read_text()
        assert (
            "worker joined worker=mallory" not in text and "worker joined worker=plain" not in text
        )
        import urllib.request

        scraped = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
        )
        assert 'elastic_updates_rejected_total{reason="data_unknown_key"}' in scraped

        def cli(*extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "elastic",
                    "job",
                    "ls",
                    "--coordinator",
                    control,
                    "--timeout",
                    "3",
                    *extra,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )

        admin = cli(
            "--curve-key",
            str(k / "admins" / "alice.key_secret"),
            "--coordinator-key",
            str(k / "coordinator.key"),
        )
        assert admin.returncode == 0 and "lin" in admin.stdout, admin.stderr
        as_worker = cli(
            "--curve-key",
            str(k / "workers" / "good.key_secret"),
            "--coordinator-key",
            str(k / "coordinator.key"),
        )
        assert as_worker.returncode == 3  # a worker key is not an admin key
        plaintext = cli()
        assert plaintext.returncode == 3 and "--curve-key" in plaintext.stderr
    finally:
        tap.close()
