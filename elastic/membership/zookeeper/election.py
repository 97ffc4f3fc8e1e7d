"""Coordinator election over ZooKeeper (``ZkElection``).

Each candidate creates an ephemeral sequential znode under ``election/`` holding its
record; the lowest sequence leads. A candidate that finds itself lowest bumps the
data version of ``term``: that version is its fencing token. Every fenced write is
one transaction that checks both its own candidate node (gone with its session) and
``term``'s version (moved on by any later leader), so a deposed leader, however
long it slept, writes nothing. The session is the lease: a thread pings ZooKeeper
every third of the TTL, and ``holds`` counts from the last answer.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from elastic.errors import ConfigError
from elastic.membership.cluster import Election, FencedOutbox, LeaderRecord
from elastic.membership.zookeeper.client import RPC_TIMEOUT, Paths, bounded, connect, parse_zk_url

__all__ = ["ZkElection", "read_leader"]

log = logging.getLogger("elastic.zookeeper")


def read_leader(client: Any, paths: Paths) -> LeaderRecord | None:
    """The lowest candidate's record, or None when there is no candidate."""
    from kazoo.exceptions import NoNodeError  # noqa: PLC0415

    try:
        children = sorted(bounded(client.get_children_async(paths.election)))
    except NoNodeError:
        return None
    for child in children:  # the lowest; the next if it went meanwhile
        try:
            data, _ = bounded(client.get_async(f"{paths.election}/{child}"))
        except NoNodeError:
            continue
        return LeaderRecord.from_json(data)
    return None


class ZkElection(Election):
    def __init__(self, url: str, coordinator_id: str, ttl: float = 10.0) -> None:
        if ttl < 2:
            raise ConfigError(f"leader lease TTL must be at least 2 s, got {ttl}")
        self.paths = Paths(parse_zk_url(url).cluster)
        self.id = coordinator_id
        self.ttl = ttl
        self.client = connect(url, ttl)
        self.client.ensure_path(self.paths.election)
        self.client.ensure_path(self.paths.term)
        self.node = ""  # our candidate znode while campaigning or leading
        self.token = 0
        self.renewed_at = float("-inf")
        self.lost = threading.Event()
        self.changed = threading.Event()
        self.cluster = self.paths.cluster
        self._term_over = threading.Event()  # ends this term's keep-alive
        self._outbox = FencedOutbox(self.publish, 2 * ttl)
        self.client.add_listener(self._on_state)

    def _on_state(self, state: str) -> None:  # kazoo's connection thread: no calls here
        if state == "LOST":  # the session expired: our candidate node is gone
            if self.token:
                log.error(
                    "ZooKeeper session expired cluster=%s: no longer leading", self.paths.cluster
                )
                self.lost.set()
            self.node = ""
        self.changed.set()

    def _leader(self) -> LeaderRecord | None:
        return read_leader(self.client, self.paths)

    def _try_to_lead(self, record: LeaderRecord) -> bool:
        """Stand (once) and lead if our candidate node is the lowest."""
        asked = time.monotonic()
        if not self.node or not bounded(self.client.exists_async(self.node)):
            path = bounded(
                self.client.create_async(
                    f"{self.paths.election}/n_",
                    record.to_json().encode(),
                    ephemeral=True,
                    sequence=True,
                )
            )
            self.node = str(path)
        candidates = sorted(
            bounded(
                self.client.get_children_async(
                    self.paths.election, watch=lambda _event: self.changed.set()
                )
            )
        )
        if not candidates or f"{self.paths.election}/{candidates[0]}" != self.node:
            return False
        stat = bounded(self.client.set_async(self.paths.term, self.node.encode()))
        self.token = stat.version  # grows with every leader: our fencing token
        log.info(
            "leading cluster=%s address=%s node=%s token=%d ttl=%.0fs",
            self.paths.cluster,
            record.address,
            self.node.rsplit("/", 1)[-1],
            self.token,
            self.ttl,
        )
        self.renewed_at = asked
        self.lost.clear()
        self._term_over = threading.Event()
        threading.Thread(
            target=self._keep_alive, args=(self._term_over,), name="zk-leader", daemon=True
        ).start()
        self._outbox.start("zk-publish")
        return True

    def _fenced(self) -> Any:
        """A transaction that goes through only while we lead."""
        tx = self.client.transaction()
        tx.check(self.node, 0)
        tx.check(self.paths.term, self.token)
        return tx

    def _outcome(self, results: list[object]) -> bool:
        """True when every operation went through; False when the fence failed."""
        from kazoo.exceptions import BadVersionError, NoNodeError  # noqa: PLC0415

        failed = [r for r in results if isinstance(r, Exception)]
        if not failed:
            return True
        if isinstance(failed[0], BadVersionError | NoNodeError) and not self.lost.is_set():
            log.error("another coordinator leads cluster=%s: stepping down", self.paths.cluster)
            self.lost.set()
        return False

    def check(self) -> bool | None:
        """A lost connection is waited on (up to ``RPC_TIMEOUT``): a process that slept
        past its session learns on reconnecting that the session expired, and that is
        a definite no."""
        from kazoo.exceptions import ConnectionLoss, SessionExpiredError  # noqa: PLC0415

        if self.lost.is_set() or not self.token:
            return False
        deadline = time.monotonic() + RPC_TIMEOUT
        while True:
            try:
                return self._outcome(
                    bounded(self._fenced().commit_async(), max(0.05, deadline - time.monotonic()))
                )
            except SessionExpiredError:
                log.error(
                    "ZooKeeper session expired cluster=%s: no longer leading", self.paths.cluster
                )
                self.lost.set()
                return False
            except ConnectionLoss:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                error = "ConnectionLoss"
            except Exception as exc:
                error = type(exc).__name__
            log.warning("cannot confirm leadership error=%s; not committing now", error)
            return None

    def holds(self) -> bool:
        return not self.lost.is_set() and time.monotonic() - self.renewed_at < self.ttl

    def publish(self, path: str, value: str) -> bool | None:
        """Write ``path`` if we still lead (one transaction). True: written; False:
        another coordinator leads; None: ZooKeeper failed."""
        full = self.paths.path(path)
        try:
            self.client.ensure_path(full.rsplit("/", 1)[0])
            exists = bounded(self.client.exists_async(full)) is not None
            tx = self._fenced()
            if exists:
                tx.set_data(full, value.encode())
            else:
                tx.create(full, value.encode())
            return self._outcome(bounded(tx.commit_async()))
        except Exception as exc:
            if type(exc).__name__ == "SessionExpiredError":  # our candidate node went with it
                self.lost.set()
                return False
            log.warning("cannot write %s to ZooKeeper error=%s; retrying", path, type(exc).__name__)
            return None

    def publish_later(self, path: str, value: str) -> None:
        self._outbox.put(path, value)

    def _keep_alive(self, term_over: threading.Event) -> None:
        """Ping every third of the TTL: each answer proves the session (the lease)
        lives at least a TTL from when it was asked."""
        while not term_over.wait(self.ttl / 3):
            asked = time.monotonic()
            try:
                alive = bounded(self.client.exists_async(self.node), self.ttl / 3) is not None
            except Exception as exc:
                if time.monotonic() - self.renewed_at < self.ttl:
                    log.warning("cannot reach ZooKeeper error=%s; retrying", type(exc).__name__)
                    continue
                log.error(
                    "ZooKeeper silent for %.0fs cluster=%s: no longer leading",
                    self.ttl,
                    self.paths.cluster,
                )
                alive = False
            if alive:
                if not term_over.is_set():
                    self.renewed_at = asked
                continue
            if not term_over.is_set():
                log.error(
                    "our candidate node is gone cluster=%s: no longer leading", self.paths.cluster
                )
                self.lost.set()
            return

    def step_down(self) -> None:
        self._term_over.set()
        self._outbox.stop(flush=not self.lost.is_set() and bool(self.token))
        if self.node:
            try:  # a standby need not wait out the session
                bounded(self.client.delete_async(self.node))
            except (
                Exception
            ) as exc:  # gone with the session already, or ZooKeeper away: it ends by itself
                log.debug("candidate node not deleted error=%s", type(exc).__name__)
        self.node, self.token = "", 0
        self.lost.set()

    def resign(self) -> None:
        self.step_down()
        self.client.stop()
        self.client.close()
