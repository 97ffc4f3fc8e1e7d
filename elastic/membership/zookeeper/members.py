"""Members in ZooKeeper: a worker's ephemeral sequential record (``ZkRegistration``),
and the coordinator's table of them (``ZkMemberTable``).

A worker's record lives as long as its session: a graceful stop closes the session
and the record goes at once; a crash is noticed when the session times out. A
sequential name (``<id>.<seq>``) lets a worker whose session expired register again
while ZooKeeper has not yet removed its old record: the worker is a member while any
record of its id exists. As with etcd, a member takes part once it has both a record
and a connection (its HELLO).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any

from elastic.errors import ConfigError
from elastic.membership.cluster import LeaderRecord, Registration
from elastic.membership.registered import RegisteredMemberTable
from elastic.membership.zookeeper.client import Paths, bounded, connect, parse_zk_url
from elastic.membership.zookeeper.election import read_leader

__all__ = ["ZkMemberTable", "ZkRegistration", "worker_of"]

log = logging.getLogger("elastic.zookeeper")
SEQUENCE = 11  # ".0000000042": the separator and ZooKeeper's ten digits


def worker_of(node: str) -> str:
    """The worker id of a record's znode name (``<id>.<seq>``)."""
    return node[:-SEQUENCE] if len(node) > SEQUENCE and node[-SEQUENCE] == "." else node


class ZkMemberTable(RegisteredMemberTable):
    """Records as ephemeral sequential znodes under ``members/``, watched; slots
    under ``slots/``."""

    def __init__(self, url: str, heartbeat_timeout: float = 3.0) -> None:
        self.paths = Paths(parse_zk_url(url).cluster)
        self.client = connect(url)
        for path in (self.paths.members, self.paths.slots):
            self.client.ensure_path(path)
        slots = {}
        for worker in self.client.get_children(self.paths.slots):
            value, _ = self.client.get(f"{self.paths.slots}/{worker}")
            if value.isdigit():
                slots[worker] = int(value)
        super().__init__(heartbeat_timeout, slots)
        self._queue: queue.Queue[dict[str, dict[str, Any]]] = (
            queue.Queue()
        )  # the records present, per watch event
        self._read: dict[str, dict[str, Any]] = {}  # znode name -> record (the watcher thread's)
        self._present: dict[str, dict[str, Any]] = {}  # worker -> record, as last handed over
        self._closed = False
        self.client.ChildrenWatch(self.paths.members, self._on_members)

    def _on_members(self, children: list[str]) -> bool | None:  # kazoo's watcher thread
        """Read the records present now (also after a reconnection: nothing missed)."""
        if self._closed:
            return False
        from kazoo.exceptions import NoNodeError  # noqa: PLC0415

        read = {node: record for node, record in self._read.items() if node in children}
        for node in sorted(set(children) - set(read)):  # records are written once: read each once
            try:
                raw, _ = self.client.get(f"{self.paths.members}/{node}")
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except NoNodeError:
                continue  # went meanwhile
            except ValueError as exc:
                log.warning("ignoring a malformed member record node=%s error=%s", node, exc)
                continue
            read[node] = record
        self._read = read
        self._queue.put({worker_of(node): record for node, record in sorted(read.items())})
        return None

    def _watch(self, now: float) -> list[tuple[str, dict[str, Any] | None]]:
        latest = None
        while True:
            try:
                latest = self._queue.get_nowait()
            except queue.Empty:
                break
        if latest is None:
            return []
        gone: list[tuple[str, dict[str, Any] | None]] = [
            (worker, None) for worker in self._present if worker not in latest
        ]
        self._present = latest
        return gone + list(latest.items())

    def _store_slot(self, worker: str, slot: int | None) -> None:
        path = f"{self.paths.slots}/{worker}"
        try:
            if slot is None:
                bounded(self.client.delete_async(path))
            elif bounded(self.client.exists_async(path)) is None:
                bounded(self.client.create_async(path, str(slot).encode()))
            else:
                bounded(self.client.set_async(path, str(slot).encode()))
        except Exception as exc:  # only the next leader's shard choice depends on it
            log.warning(
                "cannot record the slot in ZooKeeper worker=%s error=%s", worker, type(exc).__name__
            )

    def close(self) -> None:
        self._closed = True
        self.client.stop()
        self.client.close()


class ZkRegistration(Registration):
    """A worker's record, ephemeral in its own session. If the session expires (the
    worker cut off for longer than the TTL), a new one registers again as soon as
    ZooKeeper answers."""

    def __init__(self, url: str, worker_id: str, record: dict[str, Any], ttl: float = 10.0) -> None:
        if ttl < 2:
            raise ConfigError(f"lease TTL must be at least 2 s, got {ttl}")
        self.paths = Paths(parse_zk_url(url).cluster)
        self.prefix = f"{self.paths.members}/{worker_id}."
        self.record = json.dumps(record, sort_keys=True).encode()
        self.client = connect(url, ttl)
        self.node = ""
        self.leader_changed = threading.Event()
        self._expired = threading.Event()
        self._stop = threading.Event()
        for path in (self.paths.members, self.paths.election):
            self.client.ensure_path(path)
        self.client.add_listener(self._on_state)
        self._register()
        self.client.ChildrenWatch(self.paths.election, self._on_candidates)
        self._thread = threading.Thread(
            target=self._keep_registered, name="zk-registration", daemon=True
        )
        self._thread.start()

    def _on_state(self, state: str) -> None:  # kazoo's connection thread: no calls here
        if state == "LOST":
            self._expired.set()
        self.leader_changed.set()  # after any reconnection, the leader may be another

    def _on_candidates(self, _children: list[str]) -> bool | None:
        if self._stop.is_set():
            return False
        self.leader_changed.set()
        return None

    def _register(self) -> None:
        self.node = str(self.client.create(self.prefix, self.record, ephemeral=True, sequence=True))
        log.info("registered in ZooKeeper node=%s", self.node)

    def _keep_registered(self) -> None:
        while not self._stop.wait(0.5):
            if self._expired.is_set() and self.client.connected:
                try:
                    self._register()
                    self._expired.clear()
                except Exception as exc:
                    log.warning(
                        "cannot register again in ZooKeeper error=%s; retrying", type(exc).__name__
                    )

    def leader(self) -> LeaderRecord | None:
        return read_leader(self.client, self.paths)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.stop()  # closes the session: the record goes at once
        self.client.close()
