"""The etcd backend: members under leases, an election whose fencing token is the
leader key's create revision, jobs, all under ``/elastic/<cluster>/`` (the layout:
``client``). ``etcd://[USER[:PASSWORD]@]HOST:PORT[,HOST:PORT...]/CLUSTER[?ca=&cert=&key=]``."""

from __future__ import annotations

from typing import Any

from elastic.hookspecs import hookimpl
from elastic.membership.cluster import ClusterBackend, LeaderRecord
from elastic.membership.etcd.client import Keys, connect, parse_etcd_url, read_leader
from elastic.membership.etcd.election import EtcdElection
from elastic.membership.etcd.jobs import EtcdJobStore
from elastic.membership.etcd.members import EtcdMemberTable, EtcdRegistration

__all__ = ["EtcdBackend"]


class EtcdBackend(ClusterBackend):
    name = "etcd"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        # ConfigError for a bad URL, TLS files or a password that are not there,
        # before connecting
        self.keys = Keys(parse_etcd_url(url).cluster)

    def member_table(self, heartbeat_timeout: float) -> EtcdMemberTable:
        return EtcdMemberTable(self.url, heartbeat_timeout)

    def election(self, coordinator_id: str, ttl: float) -> EtcdElection:
        return EtcdElection(self.url, coordinator_id, ttl)

    def job_store(self, election: Any) -> EtcdJobStore:
        return EtcdJobStore(election)

    def registration(self, worker_id: str, record: dict[str, Any], ttl: float) -> EtcdRegistration:
        return EtcdRegistration(self.url, worker_id, record, ttl)

    def leader(self) -> LeaderRecord | None:
        client = connect(self.url)
        try:
            return read_leader(client, self.keys)
        finally:
            client.close()


@hookimpl
def elastic_cluster_backends() -> list[type]:
    return [EtcdBackend]
