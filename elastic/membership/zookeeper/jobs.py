"""Jobs kept in ZooKeeper (``ZkJobStore``): ``jobs/<id>/spec|state|status``.

Publishing is one transaction that creates ``jobs/<id>`` with its spec and state,
so two coordinators publishing one id cannot both win. The leader watches
``jobs/`` for new jobs, and each job's ``spec`` and ``state`` for changes; kazoo
sets the watches again after a lost connection and reports what is there now.
"""

from __future__ import annotations

import json
import queue
from typing import Any

from elastic.errors import MembershipUnavailable
from elastic.membership.cluster import JobStore
from elastic.membership.zookeeper.client import RPC_TIMEOUT, bounded
from elastic.membership.zookeeper.election import ZkElection

__all__ = ["ZkJobStore"]

PARTS = ("spec", "state", "status")


class ZkJobStore(JobStore):
    def __init__(self, election: ZkElection) -> None:
        super().__init__(election)
        self.client = election.client
        self.paths = election.paths
        self.client.ensure_path(self.paths.jobs)
        self._queue: queue.Queue[tuple[str, str, bytes]] = queue.Queue()
        self._watched: set[str] = set()
        self._closed = False
        self.client.ChildrenWatch(self.paths.jobs, self._on_jobs)

    def _on_jobs(self, children: list[str]) -> bool | None:  # kazoo's watcher thread
        if self._closed:
            return False  # stops the watch
        for job_id in children:
            if job_id not in self._watched:
                self._watched.add(job_id)
                for part in ("spec", "state"):
                    self.client.DataWatch(self.paths.job(job_id, part), self._on_data(job_id, part))
        return None

    def _on_data(self, job_id: str, part: str) -> Any:
        def changed(data: bytes | None, _stat: Any) -> bool | None:
            if self._closed:
                return False
            if data is not None:
                self._queue.put((job_id, part, data))
            return None

        return changed

    def publish(self, job_id: str, spec: dict[str, Any]) -> bool:
        from kazoo.exceptions import NodeExistsError  # noqa: PLC0415

        tx = self.client.transaction()
        tx.create(self.paths.job(job_id), b"")
        tx.create(self.paths.job(job_id, "spec"), json.dumps(spec).encode())
        tx.create(self.paths.job(job_id, "state"), b"running")
        try:
            results = bounded(tx.commit_async(), 2 * RPC_TIMEOUT)
        except Exception as exc:
            raise MembershipUnavailable(
                f"ZooKeeper did not answer while publishing job {job_id} ({type(exc).__name__}); "
                "check the ZooKeeper servers"
            ) from None
        failed = [r for r in results if isinstance(r, Exception)]
        if failed and not isinstance(failed[0], NodeExistsError):
            raise MembershipUnavailable(
                f"ZooKeeper refused job {job_id}: {type(failed[0]).__name__}"
            )
        return not failed

    def jobs(self) -> dict[str, dict[str, bytes]]:
        from kazoo.exceptions import NoNodeError  # noqa: PLC0415

        found: dict[str, dict[str, bytes]] = {}
        try:
            for job_id in bounded(self.client.get_children_async(self.paths.jobs)):
                for part in PARTS:
                    try:
                        found.setdefault(job_id, {})[part] = bounded(
                            self.client.get_async(self.paths.job(job_id, part))
                        )[0]
                    except NoNodeError:
                        continue
        except NoNodeError:
            return {}
        except Exception as exc:
            raise MembershipUnavailable(
                f"ZooKeeper did not answer while reading jobs ({type(exc).__name__}); check the "
                "ZooKeeper servers"
            ) from None
        return found

    def set_state(self, job_id: str, state: str) -> None:
        self.check_state(state)
        path = self.paths.job(job_id, "state")
        try:
            self.client.ensure_path(self.paths.job(job_id))
            if bounded(self.client.exists_async(path)) is None:
                bounded(self.client.create_async(path, state.encode()))
            else:
                bounded(self.client.set_async(path, state.encode()))
        except Exception as exc:
            raise MembershipUnavailable(
                f"ZooKeeper did not answer while setting job {job_id} {state} "
                f"({type(exc).__name__}); check the ZooKeeper servers"
            ) from None

    def changes(self, now: float) -> list[tuple[str, str, bytes]]:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._closed = True  # the watches end at their next event
