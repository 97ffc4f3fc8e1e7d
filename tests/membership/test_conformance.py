"""The cluster backend contract (``conformance.py``) against every backend: embedded,
and real etcd and ZooKeeper servers of our own (ZooKeeper also over TLS, as a user)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from elastic.membership.cluster import ClusterBackend, Election
from elastic.membership.etcd.client import Keys, connect
from elastic.membership.zookeeper.client import Paths
from elastic.membership.zookeeper.client import connect as zk_connect
from tests.certificates import certificates
from tests.etcd_server import EtcdServer
from tests.membership.conformance import ClusterConformance
from tests.zk_server import ZkServer, require_zookeeper


@pytest.fixture(scope="module")
def zk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZkServer]:
    server = ZkServer(Path(tmp_path_factory.mktemp("zk")), require_zookeeper()).start()
    yield server
    server.stop()


def fresh_cluster() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


class TestEmbedded(ClusterConformance):
    @pytest.fixture
    def url(self) -> str:
        return "embedded://"


class TestEtcd(ClusterConformance):
    @pytest.fixture
    def url(self, etcd_server: EtcdServer) -> str:
        self.server, self.cluster = etcd_server, fresh_cluster()
        return f"etcd://{etcd_server.url}/{self.cluster}"

    def depose(self, election: Election) -> None:
        client = connect(f"etcd://{self.server.url}/{self.cluster}")
        client.revoke_lease(election.lease.id)  # type: ignore[attr-defined]  # as if etcd expired it
        client.close()

    def restart(self) -> None:
        self.server.restart()

    def read(self, backend: ClusterBackend, path: str) -> bytes | None:
        client = connect(backend.url)
        try:
            return client.get(Keys(self.cluster).path(path))[0]
        finally:
            client.close()


class TestZooKeeper(ClusterConformance):
    @pytest.fixture
    def url(self, zk_server: ZkServer) -> str:
        self.server, self.cluster = zk_server, fresh_cluster()
        self.admin_url = f"zk://{zk_server.hosts}/{self.cluster}"
        return self.admin_url

    def depose(self, election: Election) -> None:
        client = zk_connect(self.admin_url)
        client.delete(election.node)  # type: ignore[attr-defined]  # as its session's expiry would
        client.stop()
        client.close()

    def restart(self) -> None:
        self.server.restart()

    def read(self, backend: ClusterBackend, path: str) -> bytes | None:
        from kazoo.exceptions import NoNodeError

        client = zk_connect(backend.url)
        try:
            return client.get(Paths(self.cluster).path(path))[0]
        except NoNodeError:
            return None
        finally:
            client.stop()
            client.close()


@pytest.fixture(scope="module")
def zk_secure_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZkServer]:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    root = Path(tmp_path_factory.mktemp("zk-tls"))
    certs = certificates(root / "pki")
    server = ZkServer(root, require_zookeeper(), certs).start()
    server.certs = certs  # type: ignore[attr-defined]
    yield server
    server.stop()


class TestZooKeeperSecure(TestZooKeeper):
    """Over TLS with a client certificate, as a digest user: every znode of the
    cluster carries that user's ACL, and the contract holds as it does in the open."""

    @pytest.fixture
    def url(self, zk_secure_server: ZkServer) -> str:
        certs = zk_secure_server.certs  # type: ignore[attr-defined]
        self.server, self.cluster = zk_secure_server, fresh_cluster()
        self.admin_url = (
            f"zk://alice:s3cret@{zk_secure_server.secure_hosts}/{self.cluster}"
            f"?ca={certs['ca']}&cert={certs['client']}&key={certs['client_key']}"
        )
        return self.admin_url
