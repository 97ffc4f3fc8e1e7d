"""Jobs kept in etcd (``EtcdJobStore``), so that whichever coordinator leads serves them.

Per job, under ``/elastic/<cluster>/jobs/<id>/``: ``spec`` (the validated spec as
JSON, written once), ``state`` (what the operator wants) and ``status`` (what the
leader reports, written through the election's fenced writer). The leader follows
``spec`` and ``state`` through a watch.
"""

from __future__ import annotations

import json
from typing import Any

from elastic.membership.cluster import JobStore
from elastic.membership.etcd.client import RPC_TIMEOUT, PrefixWatch, retrying
from elastic.membership.etcd.election import EtcdElection

__all__ = ["EtcdJobStore"]


class EtcdJobStore(JobStore):
    def __init__(self, election: EtcdElection) -> None:
        super().__init__(election)
        self.keys = election.keys
        self.client = election.client
        self.prefix = self.keys.root + "jobs/"
        self._watch = PrefixWatch(self.client, self.prefix)

    def publish(self, job_id: str, spec: dict[str, Any]) -> bool:
        tx = self.client.transactions
        spec_key = self.keys.job(job_id, "spec")
        stored, _ = retrying(
            self.client,
            f"publishing job {job_id}",
            lambda: self.client.transaction(
                compare=[tx.create(spec_key) == 0],
                success=[
                    tx.put(spec_key, json.dumps(spec)),
                    tx.put(self.keys.job(job_id, "state"), "running"),
                ],
                failure=[],
            ),
        )
        return bool(stored)

    def jobs(self) -> dict[str, dict[str, bytes]]:
        found: dict[str, dict[str, bytes]] = {}
        for value, meta in retrying(
            self.client, "reading jobs", lambda: list(self.client.get_prefix(self.prefix))
        ):
            job_id, _, part = meta.key.decode("utf-8", "replace")[len(self.prefix) :].partition("/")
            found.setdefault(job_id, {})[part] = value
        return found

    def set_state(self, job_id: str, state: str) -> None:
        self.check_state(state)
        retrying(
            self.client,
            f"setting job {job_id} {state}",
            lambda: self.client.put(self.keys.job(job_id, "state"), state),
            timeout=RPC_TIMEOUT,
        )

    def changes(self, now: float) -> list[tuple[str, str, bytes]]:
        out = []
        for name, value in self._watch.changes(now):
            job_id, _, part = name.partition("/")
            if value is not None and part in ("spec", "state"):
                out.append((job_id, part, value))
        return out

    def close(self) -> None:
        self._watch.close()
