"""The docker-compose cluster: the file validates, and the same topology (etcd, a
coordinator, 3 workers, each on a host of its own) runs a job to completion in
network namespaces on a bridge, with the commands, environment and host names the
compose file gives each service. There is no Docker engine here; namespaces are
what containers are made of."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.etcd_server import etcd_binary

from .conftest import wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker" / "docker-compose.yml"
needs_compose = pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs docker-compose (apt install docker-compose)")


def compose_config(*flags: str) -> dict[str, Any]:
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE), *flags, "config"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@needs_compose
def test_compose_file_validates_and_scales() -> None:
    config = compose_config()
    services = config["services"]
    assert set(services) == {"keys", "etcd", "coordinator", "coordinator-standby", "worker"}
    assert services["coordinator-standby"]["profiles"] == ["failover"]  # started only with --profile failover
    assert "profiles" not in services["coordinator"] and "profiles" not in services["worker"]
    etcd_image = services["etcd"]["image"]
    assert etcd_image.startswith("quay.io/coreos/etcd:v3.5.") and "latest" not in etcd_image
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert service.get("restart") in ("on-failure", "unless-stopped", "always") or name == "keys", name  # keys runs once
    for name in ("coordinator", "coordinator-standby"):  # CURVE on every socket, keys from the one-shot service
        env = services[name]["environment"]
        assert env["ELASTIC_CURVE_KEY"] == "/keys/coordinator.key_secret" and "ELASTIC_INSECURE" not in env
        assert "keys:/keys:ro" in services[name]["volumes"]
    assert services["worker"]["environment"]["ELASTIC_COORDINATOR_KEY"] == "/keys/coordinator.key"
    worker = services["worker"]
    assert "ports" not in worker and "container_name" not in worker  # --scale worker=N
    assert "checkpoints:/var/lib/elastic/state:rw" in services["coordinator"]["volumes"]
    standby = services["coordinator-standby"]
    assert "checkpoints:/var/lib/elastic/state:rw" in standby["volumes"]  # the same checkpoints
    assert not any(arg.startswith("--job") for arg in standby["command"])  # it serves what etcd holds


def test_dockerfile_is_small_non_root_and_checks_health() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in text and "FROM ${BASE} AS build" in text  # a build argument picks the base
    assert "USER elastic" in text and "HEALTHCHECK" in text and "--no-cache-dir" in text
    assert 'ENTRYPOINT ["elastic"]' in text
    # the health check the image runs: fresh file healthy, stale file not
    check = ROOT / "docker" / "healthcheck.py"
    alive = Path(f"/tmp/elastic-alive-{uuid.uuid4().hex[:6]}")
    env = dict(os.environ, ELASTIC_HEALTH_FILE=str(alive), ELASTIC_HEALTH_MAX_AGE="5")
    assert subprocess.run([sys.executable, str(check)], env=env, capture_output=True).returncode == 1
    alive.touch()
    assert subprocess.run([sys.executable, str(check)], env=env, capture_output=True).returncode == 0
    os.utime(alive, (time.time() - 60, time.time() - 60))
    assert subprocess.run([sys.executable, str(check)], env=env, capture_output=True).returncode == 1
    alive.unlink()


# ------------------------------------------------------------ namespaces --


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


class Hosts:
    """Network namespaces on one bridge, each with an address, a host name and an
    /etc/hosts naming all of them (``ip netns exec`` mounts /etc/netns/NS/hosts)."""

    def __init__(self, names: list[str]) -> None:
        tag = uuid.uuid4().hex[:5]
        self.bridge = f"elbr{tag}"
        self.ns = {name: f"el{tag}-{name}" for name in names}
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
            run("ip", "netns", "exec", ns, "ip", "link", "set", f"{self.bridge}p{i}", "name", inside)
            run("ip", "link", "set", outside, "master", self.bridge)
            run("ip", "link", "set", outside, "up")
            run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.ip[name]}/24", "dev", inside)
            run("ip", "netns", "exec", ns, "ip", "link", "set", inside, "up")
            run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)

    def spawn(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Run ``argv`` on host ``name``: its namespace, and its own host name (UTS)."""
        wrapped = ["ip", "netns", "exec", self.ns[name], "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]
        with open(log, "ab") as out:
            return subprocess.Popen(wrapped, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def down(self) -> None:
        for ns in self.created:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("needs root, ip and unshare")
    h = Hosts(["etcd", "coordinator", "worker-1", "worker-2", "worker-3"])
    try:
        h.up()
    except subprocess.CalledProcessError as exc:
        h.down()
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
    yield h
    h.down()


@needs_compose
def test_the_compose_topology_runs_a_job_across_five_hosts(hosts: Hosts, tmp_path: Path) -> None:
    services = compose_config()["services"]
    procs: list[subprocess.Popen] = []
    state = tmp_path / "state"
    # The compose file's container paths, mapped to this machine.
    paths = {"/var/lib/elastic/state": str(state), "/jobs/": str(ROOT / "examples") + "/", "/etcd-data": str(tmp_path / "etcd-data"), "/keys": str(tmp_path / "keys")}

    def here(value: str) -> str:
        for container, host in paths.items():
            value = value.replace(container, host)
        return value

    def argv(service: str, program: list[str]) -> list[str]:
        return program + [here(arg) for arg in services[service]["command"]]

    def env(service: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if k != "ELASTIC_INSECURE"}
        base["PATH"] = f"{Path(sys.executable).parent}:{base.get('PATH', '')}"  # `elastic` as the image has it
        return dict(base, PYTHONUNBUFFERED="1", **{k: here(str(v)) for k, v in (services[service].get("environment") or {}).items()})

    elastic = [sys.executable, "-m", "elastic"]
    keys = subprocess.run([*services["keys"]["entrypoint"], *argv("keys", [])], env=env("keys"), capture_output=True, text=True, timeout=120)
    assert keys.returncode == 0, keys.stderr  # the one-shot keys service, as compose runs it first
    try:
        etcd = argv("etcd", [])
        assert etcd[0] == "etcd"
        procs.append(hosts.spawn("etcd", [str(etcd_binary()), *etcd[1:]], env("etcd"), tmp_path / "etcd.log"))
        procs.append(hosts.spawn("coordinator", argv("coordinator", elastic), env("coordinator"), tmp_path / "coordinator.log"))
        for i in (1, 2, 3):
            procs.append(hosts.spawn(f"worker-{i}", argv("worker", elastic) + ["--device", "cpu", "--threads", "1"], env("worker"), tmp_path / f"worker-{i}.log"))
        status = state / "digits-cluster" / "status.json"

        def finished() -> dict[str, Any] | None:
            try:
                s = json.loads(status.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return None
            return s if s["state"] == "finished" else None

        try:
            done = wait_for(finished, 240, "the job to finish across the namespaces")
        except AssertionError:
            logs = "\n".join(f"----- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
            raise AssertionError(f"the job did not finish\n{logs}") from None
        assert [h["round"] for h in done["history"]] == list(range(1, done["rounds"] + 1))
        assert all(h["updates"] == 3 for h in done["history"])
        assert done["final"]["accuracy"] >= 0.85, done["final"]
        log = (tmp_path / "coordinator.log").read_text()
        for i in (1, 2, 3):  # each worker came from its own host, by its own name
            assert f'"host": "worker-{i}"' in log or f"host=worker-{i}" in log, log[-2000:]
        assert "address=tcp://coordinator:5555" in log  # what it published in etcd for the workers
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
