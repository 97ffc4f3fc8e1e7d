"""``torchrun --rdzv-backend=etcd-v3``: torch's dynamic rendezvous on etcd v3.

torch finds this handler through its entry-point group ``torchrun.handlers``
(``pyproject.toml``): the entry point is ``handler_creator``, which returns the
function torch calls with the run's ``RendezvousParameters``::

    torchrun --rdzv-backend=etcd-v3 --rdzv-endpoint=127.0.0.1:2379 --rdzv-id=JOB \\
        --nnodes=1:4 train.py

The endpoint is ``HOST:PORT[,HOST:PORT...]`` or an ``etcd://`` URL with TLS and
authentication options, as the daemons take (``elastic.distributed.etcd_access``).
``--rdzv-conf`` takes torch's handler options (``join_timeout``, ``last_call_timeout``,
``close_timeout``, ``heartbeat``, ``keep_alive_interval``) and ``ttl`` (seconds the
run's keys outlive their last writer, default 7200) and ``read_timeout`` (seconds an
unanswered etcd call is retried, default 60).

Nothing is hosted by an agent: the rendezvous state and the agents' store are in
etcd, and the workers' own store (``MASTER_ADDR``/``MASTER_PORT``) is hosted by
worker rank 0 of each round, because torch's shared agent store is turned off
(``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, unless the user set it): an agent that
dies takes no store the others need with it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["create_backend", "create_handler", "handler_creator"]

SHARE_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def create_backend(params: Any) -> tuple[Any, Any]:
    """The etcd v3 rendezvous backend and store for ``params`` (torch's
    ``RendezvousParameters``)."""
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError  # noqa: PLC0415

    from elastic.distributed.etcd_access import (  # noqa: PLC0415
        RunLease,
        connect_endpoint,
        run_prefix,
    )
    from elastic.distributed.etcd_rendezvous import (  # noqa: PLC0415
        DEFAULT_TTL,
        EtcdV3RendezvousBackend,
    )
    from elastic.distributed.etcd_store import EtcdV3Store  # noqa: PLC0415
    from elastic.errors import MembershipUnavailable  # noqa: PLC0415

    read_timeout = params.get_as_int("read_timeout", 60)
    if read_timeout is None or read_timeout <= 0:
        raise ValueError("The read timeout must be a positive integer.")
    ttl = params.get_as_int("ttl", DEFAULT_TTL)
    if ttl is None or ttl < 10:
        raise ValueError("The ttl of a run's keys must be at least 10 seconds.")
    try:
        client, cluster = connect_endpoint(params.endpoint, timeout=min(read_timeout, 10))
    except MembershipUnavailable as exc:
        raise RendezvousConnectionError(f"The connection to etcd has failed: {exc}") from exc
    prefix = run_prefix(cluster, params.run_id)
    lease = RunLease(client, ttl)
    backend = EtcdV3RendezvousBackend(client, prefix + "state", lease, timeout=read_timeout)
    return backend, EtcdV3Store(client, prefix + "store/", lease)


def create_handler(params: Any) -> Any:
    """torch's ``DynamicRendezvousHandler`` on the etcd v3 backend and store."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous  # noqa: PLC0415

    os.environ.setdefault(SHARE_STORE, "1")
    backend, store = create_backend(params)
    return dynamic_rendezvous.create_handler(store, backend, params)


def handler_creator() -> Callable[[Any], Any]:
    """The entry point torch loads from ``torchrun.handlers``: it returns the creator."""
    return create_handler
