"""What every job engine shares: its parts, the operator's wishes, and the waiting.

An engine drives one job. It is socket-free: the coordinator core gives it members,
updates and the time, and sends the messages it answers with. ``RoundEngine``
(``rounds.py``) runs synchronous rounds; ``AsyncEngine`` (``asynchronous.py``)
folds updates in as they arrive. Both are made of the same parts: an
``UpdateValidator`` (``validation.py``: the path of every update, in one file), a
``Committer`` (``commit.py``: fence, finalize, evaluate, checkpoint) and a
``StatusPublisher`` (``status.py``), all given one ``EngineContext``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from elastic.coordinator.commit import Committer
from elastic.coordinator.context import EngineContext
from elastic.coordinator.job import Job, JobState
from elastic.coordinator.status import StatusPublisher
from elastic.coordinator.uploads import Part
from elastic.coordinator.validation import Refusal, UpdateValidator
from elastic.membership.base import Member
from elastic.rules import Said
from elastic.training import update_template
from elastic.wire.buffers import BufferSet
from elastic.wire.header import Message, MsgType
from elastic.wire.parts import Segment
from elastic.wire.tensors import WireTensor

__all__ = ["Engine", "Outgoing"]

log = logging.getLogger("elastic.rounds")


@dataclass
class Outgoing:
    """A message to send. ``buffers``: the pooled memory its frames alias; the sender
    attaches its tracker, then releases the set once the batch is out."""

    worker: str
    message: Message
    buffers: BufferSet | None = None


class Engine(ABC):
    """One job's driver, made of a validator, a committer and a status publisher."""

    folds_parts = False  # takes big updates in parts (``on_update_part``)
    workers_wait = False  # every participant waits for each commit (synchronous rounds)

    def __init__(self, job: Job, ctx: EngineContext | None = None) -> None:
        self.job = job
        self.ctx = ctx or EngineContext()
        self.clock = self.ctx.clock
        self.publisher = StatusPublisher(job, self.ctx, self.status)
        self.committer = Committer(job, self.ctx, self.publisher, self.workers_wait)
        self.validator = UpdateValidator(job, self.ctx, self._base_weights)
        self.mode = self.validator.mode
        self.kind = self.validator.kind
        self.itemsizes = self.validator.itemsizes
        self.members_now = 0
        self.paused = False
        self.finishing = False  # the operator asked to finish: the work in progress is the last
        self._waiting_reported: int | None = None
        self.generation = 0  # rendezvous generation (data-parallel rules only)

    @property
    def fenced(self) -> bool:
        """Another coordinator leads: this engine commits nothing more."""
        return self.committer.fenced

    # ------------------------------------------------------------ interface --

    @abstractmethod
    def tick(self, members: list[Member]) -> list[Outgoing]:
        """Hand out work to the members as the rule wants; enforce deadlines."""

    @abstractmethod
    def on_update(self, worker: str, msg: Message) -> Message:
        """Validate and fold an update; the answer is an ACK or a NACK with the reason."""

    def on_update_part(self, worker: str, msg: Message, part: Part) -> Message | None:
        """Validate and fold one part of an update: None while more parts are to
        come, else the ACK or NACK of the update."""
        return self._nack(
            msg, Refusal("bad_part", f"job {self.job.spec.id} takes whole updates only")
        )

    # Only engines that take parts fold any
    def abandon_parts(self, worker: str, key: str) -> None:  # noqa: B027
        """``worker``'s update ``key``, coming in parts, will not go on (it left, or
        the coordinator refused a part): what came stays folded."""

    def on_exchange(self, worker: str, msg: Message) -> Message | None:
        """A step of a conversation between the job's rule and ``worker`` (EXCHANGE):
        None when taken (the answers go out with the next ``tick``), else the NACK."""
        return self._nack(
            msg,
            Refusal("no_exchange", f"job {self.job.spec.id} holds no conversations with workers"),
        )

    def _said(self, number: int, said: list[Said]) -> list[Outgoing]:
        """What the rule says to workers in round ``number``, as EXCHANGE messages."""
        return [
            Outgoing(
                worker,
                Message(
                    MsgType.EXCHANGE,
                    job=self.job.spec.id,
                    round=number,
                    version=self.job.version,
                    meta={"stage": stage, "data": data},
                ),
            )
            for worker, stage, data in said
        ]

    @abstractmethod
    def on_worker_failed(self, worker: str, round_: int, detail: str, key: str = "") -> None:
        """A worker said it cannot do the work it was given (``key``: the update it
        could not make)."""

    @abstractmethod
    def on_member_left(self, worker: str) -> None:
        """A member left: nothing may wait on it."""

    @abstractmethod
    def _abandon_work(self, why: str) -> None:
        """Drop the work in progress and its partial aggregate (the job is cancelled)."""

    def _in_progress(self) -> dict[str, Any]:
        """Extra status fields about the work in progress."""
        return {}

    @property
    @abstractmethod
    def in_flight(self) -> bool:
        """Whether work handed out is still to come back (a round runs, a task is out)."""

    @property
    def deadline(self) -> float | None:
        """When the work in progress stops being waited for (the engine's clock), if ever."""
        return None

    def close(self) -> None:  # noqa: B027 - most engines hold nothing outside the process
        """The coordinator stops: release what the engine holds outside the process."""

    # -------------------------------------------------------------- control --

    def set_desired(self, state: str) -> None:
        """The operator's wish: ``running``, ``paused`` (work in progress still
        commits; no new work starts), ``finished`` (work in progress commits as the
        last round, or at once with none: the final model is written and the job
        ends as if its rounds were done) or ``cancelled`` (work in progress is
        dropped; the job stops for good and its last checkpoint stays)."""
        job = self.job
        if job.done:
            return
        if (
            state == "cancelled"
            or (state == "paused") != self.paused
            and state in ("paused", "running")
            or state == "finished"
            and not self.finishing
        ):
            job.note(
                {
                    "cancelled": "cancelled",
                    "paused": "paused",
                    "running": "resumed",
                    "finished": "finishing",
                }[state]
            )
        if state == "cancelled":
            self._abandon_work("job cancelled")
            job.state = JobState.CANCELLED
            log.info(
                "job cancelled job=%s round=%d version=%d", job.spec.id, job.round, job.version
            )
            self.ctx.notify(
                "elastic_job_finished",
                job_id=job.spec.id,
                state=str(job.state),
                metrics=dict(job.final_metrics),
            )
            self.publisher.write()
        elif state == "finished":
            if not self.finishing:
                log.info(
                    "job finishing job=%s round=%d version=%d: the work in progress is the last",
                    job.spec.id,
                    job.round,
                    job.version,
                )
            self.finishing, self.paused = True, False
        elif state == "paused":
            self.paused = True
        elif state == "running" and self.paused:
            self.paused = False
            job.mark_running()
            log.info("job resumed job=%s round=%d", job.spec.id, job.round)
            self.publisher.write()
        elif state not in ("running", "paused"):
            log.warning(
                "ignoring unknown desired state job=%s state=%r (running, paused, finished or "
                "cancelled)",
                job.spec.id,
                state,
            )

    def _pause_if_asked(self, idle: bool) -> bool:
        """True while paused; the job shows as paused once no work is in progress."""
        if not self.paused:
            return False
        if idle and self.job.state is not JobState.PAUSED:
            self.job.state = JobState.PAUSED
            log.info(
                "job paused job=%s round=%d version=%d",
                self.job.spec.id,
                self.job.round,
                self.job.version,
            )
            self.publisher.write()
        return True

    def _too_few(self, members: list[Member]) -> bool:
        """True (and the job shows as waiting) while fewer than ``min_workers`` are here."""
        job = self.job
        if len(members) >= job.spec.min_workers:
            self._waiting_reported = None
            return False
        if job.state is not JobState.WAITING or self._waiting_reported != len(members):
            job.state = JobState.WAITING
            self._waiting_reported = len(members)
            log.info(
                "waiting for workers job=%s members=%d needed=%d",
                job.spec.id,
                len(members),
                job.spec.min_workers,
            )
            self.ctx.notify(
                "elastic_job_waiting",
                job_id=job.spec.id,
                members=len(members),
                needed=job.spec.min_workers,
            )
            self.publisher.write()
        return True

    def _finish_if_due(self) -> bool:
        """True (and the job finishes) when nothing is in progress and no round is
        left: a checkpoint already holds every round, the operator asked to finish,
        or the rule's budget allows no further round (``budget_spent``)."""
        job = self.job
        if job.done:
            return True
        spent = job.aggregator.exhausted() if job.round < job.spec.rounds else None
        if spent is None and job.round < job.spec.rounds and not self.finishing:
            return False
        last = job.history[-1] if job.history else {}
        if spent is not None and job.history and "eval_loss" not in last:
            last.update(job.evaluate())  # the final model, scored as a last round's would be
        job.final_metrics = job.final_metrics or {
            k: v for k, v in last.items() if k in ("loss", "eval_loss", "accuracy")
        } | {"rounds": job.round}
        if spent is not None:
            job.final_metrics["stopped"] = spent
            log.info("budget spent job=%s round=%d: %s", job.spec.id, job.round, spent)
            job.note("budget_spent", reason=spent)
            self.committer.finish(JobState.BUDGET_SPENT)
        else:
            self.committer.finish()
        return True

    # ------------------------------------------------------------- updates --

    def upload_parts(self, part_bytes: int, offered: int = 0) -> list[list[Segment]] | None:
        """The parts a big update of this job (of ``offered`` bytes) is sent in
        (``elastic.wire.parts``), or None: it comes whole, because the engine or the
        rule folds whole updates only, a norm bound looks at the whole update, or it
        comes compressed."""
        if (
            not (self.folds_parts and self.job.aggregator.folds_parts)
            or part_bytes <= 0
            or self.job.spec.limits.max_norm
            or self.job.update_chain
        ):
            return None
        return self.validator.parts(part_bytes)

    def _base_weights(self) -> Mapping[str, torch.Tensor]:
        """The weights workers trained from: the model, which does not change while a round runs."""
        return update_template(self.job.model, self.mode)

    def _key(self, worker: str, number: int, client: int | None = None) -> str:
        """The idempotency key of ``worker``'s update for round (or task) ``number``
        (and virtual ``client``)."""
        key = f"{worker}/{self.job.spec.id}/{number}"
        return key if client is None else f"{key}/{client}"

    def _work(
        self, worker: str, number: int, shard: list[int], tensors: dict[str, WireTensor]
    ) -> Message:
        """A WORK message: what to compute, on which shard, and how to send it back."""
        spec = self.job.spec
        meta = {
            "mode": self.mode,
            "task": spec.task,
            "task_params": spec.task_params,
            "train": asdict(spec.train),
            "shard": shard,
            "seed": spec.seed,
        }
        if self.job.update_chain:
            meta["codecs"] = list(self.job.update_chain.stages)
        if self.job.privacy is not None and (settings := self.job.privacy.worker_settings()):
            meta["privacy"] = {**settings, "mechanism": self.job.privacy.name}
        return Message(
            MsgType.WORK,
            job=spec.id,
            round=number,
            version=self.job.version,
            key=self._key(worker, number),
            meta=meta,
            tensors=tensors,
        )

    def _count_update(self, wire_bytes: int, raw_bytes: int) -> None:
        """An update was folded: its bytes as sent and as decoded (the compression ratio)."""
        totals = self.job.totals
        totals["update_bytes_wire"] = totals.get("update_bytes_wire", 0) + wire_bytes
        totals["update_bytes_raw"] = totals.get("update_bytes_raw", 0) + raw_bytes

    def _nack(self, msg: Message, refusal: Refusal) -> Message:
        reason, detail = refusal.reason, refusal.detail
        self.job.totals["rejected"] += 1
        log.warning(
            "update rejected job=%s sender=%s reason=%s detail=%s",
            self.job.spec.id,
            msg.sender,
            reason,
            detail,
        )
        self.ctx.notify(
            "elastic_update_rejected",
            job_id=self.job.spec.id,
            worker_id=msg.sender,
            reason=reason,
            detail=detail,
        )
        return Message(
            MsgType.NACK,
            job=msg.job,
            round=msg.round,
            version=msg.version,
            key=msg.key,
            meta={"reason": reason, "detail": detail},
        )

    # ------------------------------------------------------------ committing --

    def _commit(self, number: int, metrics: dict[str, Any]) -> bool | None:
        """The committer's verdict on making the rule's aggregate version + 1."""
        return self.committer.commit(number, metrics, self.members_now, last=self.finishing)

    def status(self) -> dict[str, Any]:
        """The job's status, with the work in progress."""
        return self.job.status(self.members_now, self._in_progress())
