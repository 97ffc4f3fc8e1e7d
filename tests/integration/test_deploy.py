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
from tests.netns import Hosts, hosts_up

from .conftest import wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker" / "docker-compose.yml"
needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="needs docker-compose (apt install docker-compose)",
)


def compose_config(*flags: str) -> dict[str, Any]:
    done = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *flags, "config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@needs_compose
def test_compose_file_validates_and_scales() -> None:
    config = compose_config()
    services = config["services"]
    assert set(services) == {"keys", "etcd", "coordinator", "coordinator-standby", "worker"}
    assert services["coordinator-standby"]["profiles"] == [
        "failover"
    ]  # started only with --profile failover
    assert "profiles" not in services["coordinator"] and "profiles" not in services["worker"]
    etcd_image = services["etcd"]["image"]
    assert etcd_image.startswith("quay.io/coreos/etcd:v3.5.") and "latest" not in etcd_image
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert (
            service.get("restart") in ("on-failure", "unless-stopped", "always") or name == "keys"
        ), name  # keys runs once
    for name in (
        "coordinator",
        "coordinator-standby",
    ):  # CURVE on every socket, keys from the one-shot service
        env = services[name]["environment"]
        assert (
            env["ELASTIC_CURVE_KEY"] == "/keys/coordinator.key_secret"
            and "ELASTIC_INSECURE" not in env
        )
        assert "keys:/keys:ro" in services[name]["volumes"]
    assert services["worker"]["environment"]["ELASTIC_COORDINATOR_KEY"] == "/keys/coordinator.key"
    worker = services["worker"]
    assert "ports" not in worker and "container_name" not in worker  # --scale worker=N
    assert "checkpoints:/var/lib/elastic/state:rw" in services["coordinator"]["volumes"]
    standby = services["coordinator-standby"]
    assert "checkpoints:/var/lib/elastic/state:rw" in standby["volumes"]  # the same checkpoints
    assert not any(
        arg.startswith("--job") for arg in standby["command"]
    )  # it serves what etcd holds


def test_dockerfile_is_small_non_root_and_checks_health() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert (
        "ARG BASE=python:3.11-slim" in text and "FROM ${BASE} AS build" in text
    )  # a build argument picks the base
    assert "USER elastic" in text and "HEALTHCHECK" in text and "--no-cache-dir" in text
    assert 'ENTRYPOINT ["elastic"]' in text
    # the health check the image runs: fresh file healthy, stale file not
    check = ROOT / "docker" / "healthcheck.py"
    alive = Path(f"/tmp/elastic-alive-{uuid.uuid4().hex[:6]}")
    env = dict(os.environ, ELASTIC_HEALTH_FILE=str(alive), ELASTIC_HEALTH_MAX_AGE="5")
    assert (
        subprocess.run([sys.executable, str(check)], env=env, capture_output=True).returncode == 1
    )
    alive.touch()
    assert (
        subprocess.run([sys.executable, str(check)], env=env, capture_output=True).returncode == 0
    )
    os.utime(alive, (time.time() - 60, time.time() - 60))
    assert (
        subprocess.run([sys.executable, str(check)], env=env, capture_output=True).returncode == 1
    )
    alive.unlink()


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    with hosts_up(["etcd", "coordinator", "worker-1", "worker-2", "worker-3"]) as h:
        yield h


@needs_compose
def test_the_compose_topology_runs_a_job_across_five_hosts(hosts: Hosts, tmp_path: Path) -> None:
    services = compose_config()["services"]
    procs: list[subprocess.Popen] = []
    state = tmp_path / "state"
    # The compose file's container paths, mapped to this machine.
    paths = {
        "/var/lib/elastic/state": str(state),
        "/jobs/": str(ROOT / "examples") + "/",
        "/etcd-data": str(tmp_path / "etcd-data"),
        "/keys": str(tmp_path / "keys"),
    }

    def here(value: str) -> str:
        for container, host in paths.items():
            value = value.replace(container, host)
        return value

    def argv(service: str, program: list[str]) -> list[str]:
        return program + [here(arg) for arg in services[service]["command"]]

    def env(service: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if k != "ELASTIC_INSECURE"}
        base["PATH"] = (
            f"{Path(sys.executable).parent}:{base.get('PATH', '')}"  # `elastic` as the image has it
        )
        return dict(
            base,
            PYTHONUNBUFFERED="1",
            **{k: here(str(v)) for k, v in (services[service].get("environment") or {}).items()},
        )

    elastic = [sys.executable, "-m", "elastic"]
    keys = subprocess.run(
        [*services["keys"]["entrypoint"], *argv("keys", [])],
        env=env("keys"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert keys.returncode == 0, keys.stderr  # the one-shot keys service, as compose runs it first
    try:
        etcd = argv("etcd", [])
        assert etcd[0] == "etcd"
        procs.append(
            hosts.spawn("etcd", [str(etcd_binary()), *etcd[1:]], env("etcd"), tmp_path / "etcd.log")
        )
        procs.append(
            hosts.spawn(
                "coordinator",
                argv("coordinator", elastic),
                env("coordinator"),
                tmp_path / "coordinator.log",
            )
        )
        for i in (1, 2, 3):
            procs.append(
                hosts.spawn(
                    f"worker-{i}",
                    argv("worker", elastic) + ["--device", "cpu", "--threads", "1"],
                    env("worker"),
                    tmp_path / f"worker-{i}.log",
                )
            )
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
            logs = "\n".join(
                f"----- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log"))
            )
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
