"""Hosts for tests: network namespaces on one bridge, each with an address, a host
name and an /etc/hosts naming all of them. Containers are made of the same parts;
there is no container engine here, and root can make namespaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


class Hosts:
    """Namespaces ``el<tag>-<name>`` on bridge ``elbr<tag>``, addresses 10.213.X.2..;
    ``ip netns exec`` mounts /etc/netns/NS/hosts over /etc/hosts inside each."""

    def __init__(self, names: list[str]) -> None:
        tag = uuid.uuid4().hex[:5]
        self.bridge = f"elbr{tag}"
        self.ns = {name: f"el{tag}-{name}" for name in names}
        self.subnet = f"10.213.{int(tag[:2], 16)}.0/24"
        self.ip = {name: f"10.213.{int(tag[:2], 16)}.{i + 2}" for i, name in enumerate(names)}
        self.created: list[str] = []

    def up(self) -> None:
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in self.ip.items())
        for i, (name, ns) in enumerate(self.ns.items()):
            run("ip", "netns", "add", ns)
            self.created.append(ns)
            outside, inside = f"{self.bridge}v{i}", "eth0"
            run("ip", "link", "add", outside, "type", "veth", "peer", "name", f"{self.bridge}p{i}")
            run("ip", "link", "set", f"{self.bridge}p{i}", "netns", ns)
            self.exec(name, "ip", "link", "set", f"{self.bridge}p{i}", "name", inside)
            run("ip", "link", "set", outside, "master", self.bridge)
            run("ip", "link", "set", outside, "up")
            self.exec(name, "ip", "addr", "add", f"{self.ip[name]}/24", "dev", inside)
            self.exec(name, "ip", "link", "set", inside, "up")
            self.exec(name, "ip", "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)

    def exec(self, name: str, *cmd: str) -> None:
        """Run a short command (ip, iptables) inside host ``name``; it must succeed."""
        run("ip", "netns", "exec", self.ns[name], *cmd)

    def spawn(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Run ``argv`` on host ``name``: its namespace, and its own host name (UTS)."""
        wrapped = [
            "ip",
            "netns",
            "exec",
            self.ns[name],
            "unshare",
            "--uts",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            name,
            *argv,
        ]
        with open(log, "ab") as out:
            return subprocess.Popen(
                wrapped, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def down(self) -> None:
        for ns in self.created:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)


@contextmanager
def hosts_up(names: list[str], *tools: str) -> Iterator[Hosts]:
    """Hosts ``names``, removed afterwards; skips the test where namespaces (or
    ``tools``, e.g. iptables) are not to be had: it needs root."""
    missing = [t for t in ("ip", "unshare", *tools) if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        pytest.skip(
            f"needs root and {', '.join(('ip', 'unshare', *tools))} (missing: "
            f"{', '.join(missing) or 'root'})"
        )
    h = Hosts(names)
    try:
        h.up()
    except subprocess.CalledProcessError as exc:
        h.down()
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
    try:
        yield h
    finally:
        h.down()
