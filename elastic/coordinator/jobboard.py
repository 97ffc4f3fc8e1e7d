"""Jobs kept in etcd, so that whichever coordinator leads serves them.

Per job, under ``/elastic/<cluster>/jobs/<id>/``: ``spec`` (the validated spec as
JSON, written once), ``state`` (what the operator wants: ``running``, ``paused`` or
``cancelled``) and ``status`` (what the leader reports: state, round, members, last
metrics). A coordinator publishes the specs it was started with; the leader serves
every spec it finds, follows ``state`` through a watch, and writes ``status`` back,
each write fenced by its leader revision.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any

from elastic.jobspec import JobSpec
from elastic.membership.election import Leadership
from elastic.membership.etcd import retrying

__all__ = ["JobBoard", "DESIRED_STATES"]

log = logging.getLogger("elastic.jobboard")
DESIRED_STATES = ("running", "paused", "cancelled")


class JobBoard:
    def __init__(self, leadership: Leadership) -> None:
        self.leadership = leadership
        self.client = leadership.client
        self.prefix = leadership.keys.root + "jobs/"
        self._changes: queue.Queue[tuple[str, str, bytes]] = queue.Queue()
        self._broken = threading.Event()
        self._next_rewatch = 0.0
        self._watch = retrying(self.client, "watching jobs", lambda: self.client.add_watch_prefix_callback(self.prefix, self._on_watch))

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
        return retrying(self.client, "reading jobs", self._read_all)

    def _read_all(self) -> dict[str, dict[str, bytes]]:
        found: dict[str, dict[str, bytes]] = {}
        for value, meta in self.client.get_prefix(self.prefix):
            job_id, part = self._split(meta.key)
            if job_id:
                found.setdefault(job_id, {})[part] = value
        return found

    def write_status(self, job_id: str, status: dict[str, Any]) -> bool:
        compact = {k: v for k, v in status.items() if k != "history"}  # etcd values stay small
        return self.leadership.publish(self._key(job_id, "status"), json.dumps(compact, default=str))

    def changes(self, now: float) -> list[tuple[str, str, bytes]]:
        """(job id, part, value) for each ``spec``/``state`` written since the last call."""
        if self._broken.is_set() and now >= self._next_rewatch:
            self._next_rewatch = now + 1.0
            try:
                self._watch = self.client.add_watch_prefix_callback(self.prefix, self._on_watch)
                self._broken.clear()
                for job_id, parts in self._read_all().items():  # what changed meanwhile
                    for part in ("spec", "state"):
                        if part in parts:
                            self._changes.put((job_id, part, parts[part]))
            except Exception as exc:
                log.debug("etcd still unreachable error=%s", type(exc).__name__)
        out = []
        while True:
            try:
                out.append(self._changes.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        try:
            self.client.cancel_watch(self._watch)
        except Exception:  # closing anyway
            pass

    def _on_watch(self, response: Any) -> None:  # on pyetcd's watcher thread: only queue
        if isinstance(response, Exception):
            self._broken.set()
            return
        for event in response.events:
            if type(event).__name__ == "DeleteEvent":
                continue
            job_id, part = self._split(event.key)
            if job_id and part in ("spec", "state"):
                self._changes.put((job_id, part, event.value))

    def _split(self, key: bytes) -> tuple[str, str]:
        rest = key.decode("utf-8", "replace")[len(self.prefix) :]
        job_id, _, part = rest.partition("/")
        return job_id, part
