"""etcd with TLS (client certificates) and authentication, end to end: a coordinator
and two workers run a job through it; a wrong password is one clear error."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.certificates import certificates
from tests.etcd_server import EtcdServer, etcd_binary

from .conftest import Cluster
from .test_failures import digits_job

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl"),
]


@pytest.fixture
def secure_etcd(tmp_path: Path):  # type: ignore[no-untyped-def]
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary")
    certs = certificates(tmp_path / "pki")
    server = EtcdServer(
        tmp_path / "etcd-tls" / "data", binary, tls={k: certs[k] for k in ("ca", "cert", "key")}
    ).start()
    ctl = [
        str(Path(binary).parent / "etcdctl"),
        f"--endpoints=https://{server.url}",
        f"--cacert={certs['ca']}",
        f"--cert={certs['client']}",
        f"--key={certs['client_key']}",
    ]
    for args in (
        ["user", "add", "root:s3cret"],
        ["user", "grant-role", "root", "root"],
        ["auth", "enable"],
    ):
        done = subprocess.run([*ctl, *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    yield server, certs
    server.stop()


def test_a_job_through_etcd_with_tls_and_a_password(
    cluster: Cluster, tmp_path: Path, secure_etcd
) -> None:  # type: ignore[no-untyped-def]
    server, certs = secure_etcd
    query = f"?ca={certs['ca']}&cert={certs['client']}&key={certs['client_key']}"
    url = f"etcd://root@{server.url}/tls{query}"  # the password comes from the environment
    env = {"ELASTIC_ETCD_PASSWORD": "s3cret"}
    cluster.spawn(
        "coordinator",
        "coordinator",
        "--bind",
        cluster.address,
        "--state-dir",
        str(cluster.state),
        "--job",
        str(digits_job(tmp_path, rounds=5, min_workers=2, epochs=1)),
        "--membership",
        url,
        env=env,
    )
    for w in ("w0", "w1"):
        cluster.spawn(
            w,
            "worker",
            "--membership",
            url,
            "--id",
            w,
            "--device",
            "cpu",
            "--threads",
            "1",
            env=env,
        )
    done = cluster.wait_status(
        "dg", lambda s: s["state"] == "finished", 120, "the job to finish through a secured etcd"
    )
    assert [h["round"] for h in done["history"]] == [1, 2, 3, 4, 5]
    log = (tmp_path / "coordinator.log").read_text()
    assert "s3cret" not in log and "leading cluster=tls" in log

    wrong = cluster.spawn(
        "bad",
        "worker",
        "--membership",
        f"etcd://root:wrong@{server.url}/tls{query}",
        "--id",
        "bad",
        "--device",
        "cpu",
    )
    assert wrong.wait(60) == 2
    lines = [line for line in (tmp_path / "bad.log").read_text().splitlines() if line.strip()]
    assert any(
        "refused user 'root'" in line and "fix the user or password" in line for line in lines
    ), lines
    assert not any("wrong" in line for line in lines)  # the password is not echoed
    plain = cluster.spawn(
        "plain",
        "worker",
        "--membership",
        f"etcd://root:s3cret@{server.url}/tls",
        "--id",
        "plain",
        "--device",
        "cpu",
    )
    assert plain.wait(60) == 2  # no TLS: etcd does not answer; one clear error after the retries


def test_torchrun_rendezvous_through_etcd_with_tls_and_a_password(secure_etcd, monkeypatch):  # type: ignore[no-untyped-def]
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from elastic.distributed.torchrun import create_backend

    server, certs = secure_etcd
    query = f"?ca={certs['ca']}&cert={certs['client']}&key={certs['client_key']}"
    monkeypatch.setenv("ELASTIC_ETCD_PASSWORD", "s3cret")
    params = RendezvousParameters("etcd-v3", f"etcd://root@{server.url}/tls{query}", "job", 1, 2)
    backend, store = create_backend(params)
    state, token, written = backend.set_state(b"state")
    assert written and backend.get_state() == (b"state", token)
    store.set("MASTER_ADDR", "127.0.0.1")
    assert store.get("MASTER_ADDR") == b"127.0.0.1"
