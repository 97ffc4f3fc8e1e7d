"""Reaching ZooKeeper: the URL, a connected client, bounded calls, and the layout.

Configured as ``zk://HOST:PORT[,HOST:PORT...]/CLUSTER`` (port 2181 when left out);
the client moves between the servers by itself. Layout (all under
``/elastic/<cluster>/``), the one place it is written down:

    members/<worker-id>.<seq>      a worker's record (JSON): ephemeral sequential,
                                   gone with the worker's session
    slots/<worker-id>              its slot (so its data shard) as the leader gave it
    election/n_<seq>               a candidate coordinator's record: ephemeral
                                   sequential; the lowest one leads
    term                           its data version is the fencing token: each new
                                   leader bumps it, and every fenced write checks it
    jobs/<job-id>/spec|state|status
    rendezvous/<job-id>/generation

A session is the lease: its timeout is the TTL (the server keeps it within its own
bounds: 2 to 20 ticks).
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar
from urllib.parse import urlsplit

from elastic.errors import ConfigError, MembershipUnavailable

__all__ = ["Paths", "parse_zk_url", "connect", "bounded", "RPC_TIMEOUT", "CONNECT_TIMEOUT"]

log = logging.getLogger("elastic.zookeeper")
T = TypeVar("T")
DEFAULT_PORT = 2181
CONNECT_TIMEOUT = 10.0  # seconds before "ZooKeeper is unreachable"
RPC_TIMEOUT = (
    3.0  # a call from the event loop waits no longer (kazoo queues calls while reconnecting)
)


def parse_zk_url(url: str) -> tuple[str, str]:
    """``zk://h1:2181,h2:2181/CLUSTER`` -> (``"h1:2181,h2:2181"``, CLUSTER)."""
    fix = "use zk://HOST:PORT[,HOST:PORT...]/CLUSTER, e.g. zk://127.0.0.1:2181/demo"
    parts = urlsplit(url)
    if parts.scheme != "zk" or not parts.netloc:
        raise ConfigError(f"membership {url!r} is not a ZooKeeper URL; {fix}")
    if "@" in parts.netloc or parts.query:
        raise ConfigError(
            f"membership {url!r}: users and options are not supported for ZooKeeper; {fix}"
        )
    cluster = parts.path.strip("/")
    if not cluster or "/" in cluster or not cluster.isprintable():
        raise ConfigError(f"membership {url!r} names no cluster (one path segment); {fix}")
    hosts = []
    for item in parts.netloc.split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", str(DEFAULT_PORT))
        if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"membership {url!r}: bad server {item!r}; {fix}")
        hosts.append(f"{host}:{port}")
    return ",".join(hosts), cluster


class Paths:
    """The znode layout of one cluster."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.root = f"/elastic/{cluster}"
        self.members = f"{self.root}/members"
        self.slots = f"{self.root}/slots"
        self.election = f"{self.root}/election"
        self.term = f"{self.root}/term"
        self.jobs = f"{self.root}/jobs"

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def job(self, job_id: str, part: str = "") -> str:
        return f"{self.jobs}/{job_id}/{part}" if part else f"{self.jobs}/{job_id}"


def connect(url: str, ttl: float = 10.0, timeout: float = CONNECT_TIMEOUT) -> Any:
    """A started ``KazooClient`` whose session times out after ``ttl`` seconds, once a
    server answers; ``MembershipUnavailable`` naming the servers and the fix after
    ``timeout`` seconds."""
    # Only daemons that use ZooKeeper pay for it
    from kazoo.client import KazooClient  # noqa: PLC0415
    from kazoo.retry import KazooRetry  # noqa: PLC0415

    hosts, _ = parse_zk_url(url)
    client = KazooClient(
        hosts=hosts,
        timeout=ttl,
        connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
        logger=logging.getLogger("elastic.zookeeper.kazoo"),
    )
    try:
        client.start(timeout=timeout)
    except Exception as exc:  # kazoo's timeout, or a refused connection
        client.stop()
        client.close()
        raise MembershipUnavailable(
            f"ZooKeeper unreachable at {hosts} after {timeout:.0f}s ({type(exc).__name__}); start "
            "ZooKeeper there or fix --membership"
        ) from None
    return client


def bounded(result: Any, timeout: float = RPC_TIMEOUT) -> Any:
    """The value of a kazoo async call, waited for at most ``timeout`` seconds
    (kazoo would wait out a reconnection); raises what the call raised, or the
    handler's timeout error."""
    return result.get(timeout=timeout)
