"""Reaching ZooKeeper: the URL, a connected client, bounded calls, and the layout.

Configured as ``zk://[USER[:PASSWORD]@]HOST:PORT[,HOST:PORT...]/CLUSTER[?ca=FILE&cert=FILE&key=FILE]``
(port 2181 when left out; ``elastic.membership.urls``); the client moves between the
servers by itself. ``ca`` turns on TLS (the server's ``secureClientPort``; ``cert``
and ``key`` add the client certificate it may ask for). A user authenticates with
ZooKeeper's ``digest`` scheme (the password from the URL or ``$ELASTIC_ZK_PASSWORD``),
and every znode the daemons create under the cluster then carries an ACL for that
user alone: other clients can neither read nor change the cluster. ``/elastic``
itself stays readable and open to new clusters, so clusters of several users share
one ensemble. Layout (all under ``/elastic/<cluster>/``), the one place it is
written down:

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

from elastic.errors import ConfigError, MembershipUnavailable
from elastic.membership.urls import ClusterURL, parse_cluster_url

__all__ = ["Paths", "parse_zk_url", "connect", "bounded", "RPC_TIMEOUT", "CONNECT_TIMEOUT"]

log = logging.getLogger("elastic.zookeeper")
T = TypeVar("T")
DEFAULT_PORT = 2181
CONNECT_TIMEOUT = 10.0  # seconds before "ZooKeeper is unreachable"
RPC_TIMEOUT = (
    3.0  # a call from the event loop waits no longer (kazoo queues calls while reconnecting)
)


def parse_zk_url(url: str) -> ClusterURL:
    """``zk://[USER@]h1:2181,h2:2181/CLUSTER[?ca=...]``: servers, cluster and access."""
    return parse_cluster_url(url, "zk", DEFAULT_PORT, "ELASTIC_ZK_PASSWORD")


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
    server answers, authenticated as the URL says; ``MembershipUnavailable`` naming
    the servers and the fix after ``timeout`` seconds, ``ConfigError`` when the
    cluster refuses the URL's user."""
    # Only daemons that use ZooKeeper pay for it
    from kazoo.client import KazooClient  # noqa: PLC0415
    from kazoo.retry import KazooRetry  # noqa: PLC0415
    from kazoo.security import make_digest_acl  # noqa: PLC0415

    target = parse_zk_url(url)
    hosts = target.hosts()
    access: dict[str, Any] = {}
    if target.user:
        access["auth_data"] = [("digest", f"{target.user}:{target.password}")]
        access["default_acl"] = [make_digest_acl(target.user, target.password, all=True)]
    if target.tls:
        access.update(
            use_ssl=True,
            ca=target.ca,
            certfile=target.cert or None,
            keyfile=target.key or None,
            verify_certs=True,
        )
    client = KazooClient(
        hosts=hosts,
        timeout=ttl,
        connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
        logger=logging.getLogger("elastic.zookeeper.kazoo"),
        **access,
    )
    try:
        client.start(timeout=timeout)
    except Exception as exc:  # kazoo's timeout, or a refused connection
        _close(client)
        tls = " over TLS (is its secureClientPort there?)" if target.tls else ""
        raise MembershipUnavailable(
            f"ZooKeeper unreachable at {hosts}{tls} after {timeout:.0f}s "
            f"({type(exc).__name__}); start ZooKeeper there or fix --membership"
        ) from None
    try:
        _check_access(client, target)
    except BaseException:
        _close(client)
        raise
    return client


def _check_access(client: Any, target: ClusterURL) -> None:
    """Make the cluster's root (``/elastic`` open to new clusters, the cluster's own
    node with the user's ACL) and read it: a wrong password or another user's
    cluster is one clear error now, not a refusal deep in the election."""
    from kazoo.exceptions import NoAuthError  # noqa: PLC0415
    from kazoo.security import make_acl  # noqa: PLC0415

    root = Paths(target.cluster).root
    try:
        if target.user:
            shared = make_acl("world", "anyone", read=True, create=True)
            client.ensure_path("/elastic", acl=[shared])
        client.ensure_path(root)
        client.get_children(root)
    except NoAuthError:
        who = f"user {target.user!r}" if target.user else "a client with no user"
        raise ConfigError(
            f"ZooKeeper refuses {who} on {root}: the password is wrong, or the cluster "
            "belongs to another user; fix the user in --membership (the password in "
            "$ELASTIC_ZK_PASSWORD) or choose another cluster name"
        ) from None


def _close(client: Any) -> None:
    client.stop()
    client.close()


def bounded(result: Any, timeout: float = RPC_TIMEOUT) -> Any:
    """The value of a kazoo async call, waited for at most ``timeout`` seconds
    (kazoo would wait out a reconnection); raises what the call raised, or the
    handler's timeout error."""
    return result.get(timeout=timeout)
