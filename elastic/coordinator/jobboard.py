"""Jobs kept in etcd, so that whichever coordinator leads serves them.

Per job, under ``/elastic/<cluster>/jobs/<id>/``: ``spec`` (the validated spec as
JSON, written once), ``state`` (what the operator wants: ``running``, ``paused``, ``finished`` or
``cancelled``) and ``status`` (what the leader reports: state, round, members, last
metrics). A coordinator publishes the specs it was started with; the leader serves
every spec it finds, follows ``state`` through a watch, and writes ``status`` back
from a background thread, each write fenced by its leader revision.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from elastic.jobspec import JobSpec
from elastic.membership.election import Leadership
from elastic.membership.etcd import RPC_TIMEOUT, PrefixWatch, retrying

__all__ = ["JobBoard", "DESIRED_STATES"]

log = logging.getLogger("elastic.jobboard")
DESIRED_STATES = ("running", "paused", "finished", "cancelled")


class JobBoard:
    def __init__(self, leadership: Leadership) -> None:
        self.leadership = leadership
        self.client = leadership.client
        self.prefix = leadership.keys.root + "jobs/"
        self._watch = PrefixWatch(self.client, self.prefix)

    def _key(self, job_id: str, part: str) -> str:
        return self.leadership.keys.job(job_id, part)

    def publish(self, spec: JobSpec) -> bool:
        """Store a spec (and ``running``) unless the job is already there. True if stored."""
        tx = self.client.transactions
        spec_key = self._key(spec.id, "spec")
        stored, _ = retrying(self.client, f"publishing job {spec.id}", lambda: self.client.transaction(
            compare=[tx.create(spec_key) == 0],
            success=[tx.put(spec_key, json.dumps(spec.to_dict())), tx.put(self._key(spec.id, "state"), "running")],
            failure=[],
        ))
        return bool(stored)

    def jobs(self) -> dict[str, dict[str, bytes]]:
        """Everything under ``jobs/``: job id -> {part: value} (retried while etcd fails)."""
        found: dict[str, dict[str, bytes]] = {}
        for value, meta in retrying(self.client, "reading jobs", lambda: list(self.client.get_prefix(self.prefix))):
            job_id, _, part = meta.key.decode("utf-8", "replace")[len(self.prefix) :].partition("/")
            found.setdefault(job_id, {})[part] = value
        return found

    def set_state(self, job_id: str, state: str) -> None:
        """Write the operator's wish for a job (raises ``MembershipUnavailable``)."""
        if state not in DESIRED_STATES:
            raise ValueError(f"desired state must be one of {DESIRED_STATES}, not {state!r}")
        retrying(self.client, f"setting job {job_id} {state}", lambda: self.client.put(self._key(job_id, "state"), state), timeout=RPC_TIMEOUT)

    def write_status(self, job_id: str, status: dict[str, Any]) -> None:
        """Queue the job's status for etcd (written in the background, fenced)."""
        compact = {k: v for k, v in status.items() if k != "history"}  # etcd values stay small
        self.leadership.publish_later(self._key(job_id, "status"), json.dumps(compact, default=str))

    def changes(self, now: float) -> list[tuple[str, str, bytes]]:
        """(job id, part, value) for each ``spec``/``state`` written since the last call."""
        out = []
        for name, value in self._watch.changes(now):
            job_id, _, part = name.partition("/")
            if value is not None and part in ("spec", "state"):
                out.append((job_id, part, value))
        return out

    def close(self) -> None:
        self._watch.close()
