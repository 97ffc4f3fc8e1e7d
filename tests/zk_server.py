"""A real ZooKeeper server for tests (Debian's ``zookeeper`` package): a free loopback
port, a temporary data dir, killed after. ``tickTime`` is 500 ms, so sessions of
1 to 10 seconds are allowed (the server keeps them within 2 to 20 ticks)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.etcd_server import free_port

JARS = [Path("/usr/share/java/zookeeper.jar")]
# Debian's zookeeper.jar names netty's handler in its class path but not netty's
# codec, which the Netty connection factory (the one that speaks TLS) needs.
NETTY_CODEC = Path("/usr/share/java/netty-codec.jar")


def zookeeper_command() -> list[str] | None:
    """How to run a standalone server here, or None when ZooKeeper is not installed."""
    java = shutil.which("java")
    if java is None or not all(jar.exists() for jar in JARS):
        return None
    return [
        java,
        "-Xmx256m",
        "-XX:+UseSerialGC",
        "-cp",
        ":".join(str(jar) for jar in [*JARS, NETTY_CODEC] if jar.exists()),
        "org.apache.zookeeper.server.ZooKeeperServerMain",
    ]


def require_zookeeper() -> list[str]:
    """The command, or skip; in CI (which installs ZooKeeper) a missing one fails."""
    command = zookeeper_command()
    if command is None:
        message = "no ZooKeeper here: apt-get install zookeeper (scripts/test.sh does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return command


class ZkServer:
    """One standalone server. ``restart`` keeps its port and data (sessions survive
    a restart shorter than their timeout); ``freeze``/``thaw`` stop it in place."""

    def __init__(
        self, root: Path, command: list[str], certs: dict[str, Path] | None = None
    ) -> None:
        self.root = root
        self.command = command
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)
        (root / "data").mkdir(exist_ok=True)
        self.config = root / "zoo.cfg"
        config = (
            f"tickTime=500\ndataDir={root / 'data'}\nclientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\nadmin.enableServer=false\nmaxClientCnxns=0\n"
            "4lw.commands.whitelist=ruok\n"
        )
        self.secure_port = 0
        if certs is not None:  # TLS beside the plain port (which the health check uses)
            self.secure_port = free_port()
            keystore = root / "server-keystore.pem"  # ZooKeeper's PEM store: key + chain
            keystore.write_text(certs["key"].read_text() + certs["cert"].read_text())
            config += (
                f"secureClientPort={self.secure_port}\nsecureClientPortAddress=127.0.0.1\n"
                "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n"
                f"ssl.keyStore.location={keystore}\nssl.keyStore.type=PEM\n"
                f"ssl.trustStore.location={certs['ca']}\nssl.trustStore.type=PEM\n"
                "ssl.clientAuth=need\n"
            )
        self.config.write_text(config)
        self.log = root / "zookeeper.log"

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def secure_hosts(self) -> str:
        return f"127.0.0.1:{self.secure_port}"

    def start(self) -> ZkServer:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*self.command, str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ZooKeeper exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            if self._ok():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"ZooKeeper did not answer within 30 s: {self.log.read_text()[-2000:]}")

    def _ok(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"ruok")
                return s.recv(4) == b"imok"
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
