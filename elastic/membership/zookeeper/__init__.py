"""The ZooKeeper backend: members as ephemeral sequential znodes, an election by the
lowest ephemeral sequential candidate whose fencing token is ``term``'s data
version, jobs, all under ``/elastic/<cluster>/`` (the layout: ``client``).
``zk://[USER@]HOST:PORT[,HOST:PORT...]/CLUSTER[?ca=FILE]``; the client is ``kazoo``."""

from __future__ import annotations

from typing import Any

from elastic.hookspecs import hookimpl
from elastic.membership.cluster import ClusterBackend, LeaderRecord
from elastic.membership.zookeeper.client import Paths, connect, parse_zk_url
from elastic.membership.zookeeper.election import ZkElection, read_leader
from elastic.membership.zookeeper.jobs import ZkJobStore
from elastic.membership.zookeeper.members import ZkMemberTable, ZkRegistration

__all__ = ["ZkBackend"]


class ZkBackend(ClusterBackend):
    name = "zk"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        # ConfigError for a bad URL, TLS files or a password that are not there,
        # before connecting
        self.paths = Paths(parse_zk_url(url).cluster)

    def member_table(self, heartbeat_timeout: float) -> ZkMemberTable:
        return ZkMemberTable(self.url, heartbeat_timeout)

    def election(self, coordinator_id: str, ttl: float) -> ZkElection:
        return ZkElection(self.url, coordinator_id, ttl)

    def job_store(self, election: Any) -> ZkJobStore:
        return ZkJobStore(election)

    def registration(self, worker_id: str, record: dict[str, Any], ttl: float) -> ZkRegistration:
        return ZkRegistration(self.url, worker_id, record, ttl)

    def leader(self) -> LeaderRecord | None:
        client = connect(self.url)
        try:
            return read_leader(client, self.paths)
        finally:
            client.stop()
            client.close()


@hookimpl
def elastic_cluster_backends() -> list[type]:
    return [ZkBackend]
