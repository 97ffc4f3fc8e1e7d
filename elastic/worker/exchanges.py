"""A worker's EXCHANGE messages: the conversation between a job's rule and this
worker within a round (an interactive privacy mechanism's keys and shares).

The training thread talks through a ``WorkChannel`` (``elastic.privacy.Channel``):
it sends, and blocks on what comes at a stage. The receiving thread hands every
EXCHANGE to ``Exchanges.deliver``: to a handler the mechanism left for that stage
(answered at once, after ``protect`` returned), else to the round's queue. Only
the newest round of each job is kept.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from elastic.errors import ElasticError
from elastic.wire.header import Message, MsgType

__all__ = ["Exchanges", "WorkChannel"]

log = logging.getLogger("elastic.worker")

Handler = Callable[[Mapping[str, Any]], dict[str, Any]]


class Exchanges:
    """Routes EXCHANGE messages to the rounds they belong to.

    Args:
        send: how a message goes to the coordinator from the training thread.
        cancelled: set when the work must stop (the worker stops).
    """

    def __init__(self, send: Callable[[Message], None], cancelled: threading.Event) -> None:
        self._send = send
        self.cancelled = cancelled
        self._lock = threading.Lock()
        self._rounds: dict[str, int] = {}  # job -> its newest round here
        self._queues: dict[tuple[str, str], queue.Queue[dict[str, Any]]] = {}  # (job, stage)
        self._handlers: dict[tuple[str, str], Handler] = {}

    def channel(self, worker: str, work: Message) -> WorkChannel:
        """The line for ``work``'s round (older rounds of its job are forgotten)."""
        with self._lock:
            self._begin(work.job, work.round)
        return WorkChannel(self, worker, work.job, work.round, work.version)

    def _begin(self, job: str, number: int) -> None:
        """Round ``number`` is the job's newest here (what came for it is kept)."""
        if self._rounds.get(job) == number:
            return
        self._rounds[job] = number
        for key in [k for k in self._queues if k[0] == job]:
            del self._queues[key]
        for key in [k for k in self._handlers if k[0] == job]:
            del self._handlers[key]

    def deliver(self, msg: Message) -> Message | None:
        """An EXCHANGE from the coordinator: the answer to send back, if a handler
        answers it; else it waits for the training thread."""
        stage, data = msg.meta["stage"], msg.meta["data"]
        with self._lock:
            if msg.round < self._rounds.get(msg.job, 0):
                return None  # a round this worker is not in any more
            self._begin(msg.job, msg.round)  # (it may come before the trainer asks)
            handler = self._handlers.get((msg.job, stage))
            if handler is None:
                self._queue(msg.job, stage).put(data)
                return None
        try:
            reply = handler(data)
        except Exception as exc:  # (the coordinator's ask was bad: it hears nothing)
            log.warning("exchange not answered job=%s stage=%s: %s", msg.job, stage, exc)
            return None
        return Message(
            MsgType.EXCHANGE,
            job=msg.job,
            round=msg.round,
            version=msg.version,
            meta={"stage": stage, "data": reply},
        )

    def _queue(self, job: str, stage: str) -> queue.Queue[dict[str, Any]]:
        return self._queues.setdefault((job, stage), queue.Queue())


class WorkChannel:
    """One round's line to the job's rule (``elastic.privacy.Channel``)."""

    def __init__(self, owner: Exchanges, me: str, job: str, number: int, version: int) -> None:
        self.owner = owner
        self.me = me
        self.job = job
        self.number = number
        self.version = version
        self.round_id = f"{job}/{number}"

    def send(self, stage: str, data: dict[str, Any]) -> None:
        self.owner._send(
            Message(
                MsgType.EXCHANGE,
                job=self.job,
                round=self.number,
                version=self.version,
                sender=self.me,
                meta={"stage": stage, "data": data},
            )
        )

    def receive(self, stage: str, timeout: float) -> dict[str, Any]:
        with self.owner._lock:
            if self.owner._rounds.get(self.job) != self.number:
                raise ElasticError(f"round {self.number} of job {self.job} is over here")
            waiting = self.owner._queue(self.job, stage)
        waited = 0.0
        while waited < timeout:
            if self.owner.cancelled.is_set():
                raise ElasticError("the worker is stopping")
            try:
                return waiting.get(timeout=min(0.1, timeout - waited))
            except queue.Empty:
                waited += 0.1
        raise ElasticError(
            f"nothing came at stage {stage!r} of round {self.number} within {timeout:g} s"
        )

    def answer(self, stage: str, handler: Handler) -> None:
        with self.owner._lock:
            if self.owner._rounds.get(self.job) == self.number:
                self.owner._handlers[(self.job, stage)] = handler
