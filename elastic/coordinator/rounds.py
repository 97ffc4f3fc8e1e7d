"""The synchronous round engine of one job.

Socket-free: it is given members, updates and the time, and answers with messages
to send. A round: pick participants among the members (all, or ``fraction`` of
them, capped by ``max_workers``), send them the model, fold each update in as it
arrives, and commit when every participant that is still alive has answered, or at
the deadline. A round commits with at least ``min_workers`` updates; with fewer it
is abandoned and run again (same number, same model version). Nothing waits on a
worker that left: it is dropped from the round at once.

Rules whose workers send gradients (``syncavg``) train data-parallel, so the data
follows the members: each set of participants is a *generation*, and the data is
split into as many shards as it has participants, one each by rank, so every sample
is in exactly one worker's batch per step. A participant lost mid-round would leave
its shard out of the step: the round is re-run with the next generation instead.
Train-mode rules (FedAvg) keep a fixed shard per slot: in federated learning the
data belongs to the worker.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from elastic.api import Update
from elastic.coordinator.job import Job, JobState
from elastic.errors import Fenced
from elastic.membership.base import Member
from elastic.training import move_to_fresh_memory, update_kind, update_template
from elastic.wire.buffers import BufferSet
from elastic.wire.messages import Message, MsgType, WireTensor

__all__ = ["RoundEngine", "Outgoing"]

log = logging.getLogger("elastic.rounds")
Notify = Callable[..., None]


@dataclass
class Outgoing:
    """A message to send. ``buffers``: the pooled memory its frames alias; the sender
    attaches its tracker, then releases the set once the batch is out."""

    worker: str
    message: Message
    buffers: BufferSet | None = None


@dataclass
class _Round:
    number: int
    version: int
    participants: set[str]
    started: float
    deadline: float
    answered: set[str] = field(default_factory=set)
    updates: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    asked: int = 0

    @property
    def complete(self) -> bool:
        return self.participants <= self.answered


class RoundEngine:
    """Drives one job's rounds. ``notify(hook_name, **kwargs)`` reports events."""

    def __init__(
        self, job: Job, notify: Notify, clock: Callable[[], float] = time.monotonic, fence: Callable[[], bool | None] | None = None
    ) -> None:
        self.job = job
        self.notify = notify
        self.clock = clock
        # Asked before every commit (model version, checkpoint): True to go ahead;
        # False: another coordinator leads, so this engine stops for good; None: not
        # known now (etcd silent), so the round is re-run rather than committed.
        self.fence = fence or (lambda: True)
        self.fenced = False
        self.current: _Round | None = None
        self.mode = job.aggregator.worker_mode
        self.kind = update_kind(self.mode)
        self._template = {k: (tuple(t.shape), t.dtype) for k, t in update_template(job.model, self.mode).items()}
        self._waiting_reported: int | None = None
        self.members_now = 0
        self.paused = False
        self.on_status: Callable[[dict[str, Any]], None] | None = None  # also told every status
        self.rendezvous = self.mode == "gradient"
        # Workers whose work failed in a generation: each failure re-runs the step, so
        # they sit out (until they leave and join again) instead of stalling the job.
        self.benched: set[str] = set()
        self.generation = 0
        self._generation_members: tuple[str, ...] = ()
        # WORK frames alias the model's own memory (no copy per round); these are the
        # trackers of those sends. Before the rule writes the model, memory a queued
        # frame still reads is left to it and the model moves to a copy.
        self.model_sends = BufferSet({}, busy=False)

    # -------------------------------------------------------------- driving --

    def tick(self, members: list[Member]) -> list[Outgoing]:
        """Start a round when none runs and enough members exist; enforce deadlines."""
        job = self.job
        self.members_now = len(members)
        if job.done or self.fenced:
            return []
        if self.benched:  # they sit out until they leave and come back
            members = [m for m in members if m.id not in self.benched]
        now = self.clock()
        if self.paused and self.current is None:
            if job.state is not JobState.PAUSED:
                job.state = JobState.PAUSED
                log.info("job paused job=%s round=%d version=%d", job.spec.id, job.round, job.version)
                self._write_status()
            return []
        if self.current is not None:
            if now >= self.current.deadline:
                late = sorted(self.current.participants - self.current.answered)
                log.warning("round deadline passed job=%s round=%d missing=%s", job.spec.id, self.current.number, ",".join(late))
                self._close("deadline passed")
            return []
        if job.round >= job.spec.rounds:  # resumed with fewer rounds than already run
            job.final_metrics = job.final_metrics or {"rounds": job.round}
            self._finish()
            return []
        if len(members) < job.spec.min_workers:
            if job.state is not JobState.WAITING or self._waiting_reported != len(members):
                job.state = JobState.WAITING
                self._waiting_reported = len(members)
                log.info("waiting for workers job=%s members=%d needed=%d", job.spec.id, len(members), job.spec.min_workers)
                self.notify("elastic_job_waiting", job_id=job.spec.id, members=len(members), needed=job.spec.min_workers)
                self._write_status()
            return []
        return self._start(members, now)

    def _start(self, members: list[Member], now: float) -> list[Outgoing]:
        job, spec = self.job, self.job.spec
        job.state = JobState.RUNNING
        self._waiting_reported = None
        number = job.round + 1
        count = max(spec.min_workers, math.ceil(spec.fraction * len(members)))
        if spec.max_workers:
            count = min(count, spec.max_workers)
        chosen = sorted(random.Random(spec.seed * 1_000_003 + number).sample(members, min(count, len(members))), key=lambda m: m.slot)
        if self.rendezvous and tuple(m.id for m in chosen) != self._generation_members:
            self._generation_members = tuple(m.id for m in chosen)
            self.generation += 1
            log.info("new generation job=%s generation=%d members=%s", spec.id, self.generation, ",".join(self._generation_members))
        snapshot = {k: WireTensor.from_tensor(v) for k, v in job.model.state_dict().items()}
        payload = sum(t.nbytes for t in snapshot.values())
        rnd = _Round(number, job.version, {m.id for m in chosen}, now, now + spec.round_timeout, asked=len(chosen))
        out = []
        for rank, m in enumerate(chosen):
            shard = [rank, len(chosen)] if self.rendezvous else [m.slot % spec.shard_count, spec.shard_count]
            meta = {
                "mode": self.mode,
                "task": spec.task,
                "task_params": spec.task_params,
                "train": asdict(spec.train),
                "shard": shard,
                "seed": spec.seed,
            }
            msg = Message(MsgType.WORK, job=spec.id, round=number, version=job.version, key=f"{m.id}/{spec.id}/{number}", meta=meta, tensors=snapshot)
            out.append(Outgoing(m.id, msg, self.model_sends))
            rnd.bytes_sent += payload
        self.current = rnd
        job.aggregator.begin_round()
        log.info("round started job=%s round=%d version=%d participants=%d", spec.id, number, job.version, len(chosen))
        self.notify("elastic_round_started", job_id=spec.id, round=number, version=job.version, participants=sorted(rnd.participants))
        self._write_status()
        return out

    def set_desired(self, state: str) -> None:
        """The operator's wish: ``running``, ``paused`` (the round in progress still
        commits; no new one starts) or ``cancelled`` (the round in progress is dropped;
        the job stops for good and its last checkpoint stays)."""
        job = self.job
        if job.done:
            return
        if state == "cancelled":
            if self.current is not None:
                self._close("job cancelled", force_abandon=True)
            job.state = JobState.CANCELLED
            log.info("job cancelled job=%s round=%d version=%d", job.spec.id, job.round, job.version)
            self.notify("elastic_job_finished", job_id=job.spec.id, state=str(job.state), metrics=dict(job.final_metrics))
            self._write_status()
        elif state == "paused":
            self.paused = True
        elif state == "running" and self.paused:
            self.paused = False
            job.state = JobState.RUNNING
            log.info("job resumed job=%s round=%d", job.spec.id, job.round)
            self._write_status()
        elif state not in ("running", "paused"):
            log.warning("ignoring unknown desired state job=%s state=%r (running, paused or cancelled)", job.spec.id, state)

    # -------------------------------------------------------------- updates --

    def on_update(self, worker: str, msg: Message) -> Message:
        """Validate and fold an update; the answer is an ACK or a NACK with the reason."""
        job, rnd = self.job, self.current
        reason = self._refuse(worker, msg)
        if reason is not None:
            job.totals["rejected"] += 1
            return self._nack(msg, *reason)
        assert rnd is not None
        update = Update(
            worker=worker,
            base_version=msg.version,
            num_samples=int(msg.meta["num_samples"]),
            loss=float(msg.meta["loss"]),
            kind=msg.meta["kind"],
            tensors=msg.tensors,
        )
        try:
            job.aggregator.accumulate(update)
        except Exception as exc:  # a half-folded update would taint the round: re-run it
            log.exception("aggregator failed job=%s worker=%s", job.spec.id, worker)
            self._close(f"aggregator error: {exc}", force_abandon=True)
            return self._nack(msg, "aggregator_error", f"the rule failed on this update: {exc}")
        rnd.answered.add(worker)
        rnd.updates += 1
        rnd.samples += update.num_samples
        if math.isfinite(update.loss):
            rnd.loss_sum += update.loss * update.num_samples
        rnd.bytes_received += msg.payload_bytes
        job.totals["updates"] += 1
        if rnd.complete:
            self._close("all participants answered")
        return Message(MsgType.ACK, job=job.spec.id, round=msg.round, version=msg.version, key=msg.key)

    def _refuse(self, worker: str, msg: Message) -> tuple[str, str] | None:
        job, rnd = self.job, self.current
        if job.done:
            return "job_done", f"job {job.spec.id} is {job.state}"
        if rnd is None or msg.round != rnd.number:
            if msg.round <= job.round:
                return "late", f"round {msg.round} is closed; the model is at version {job.version}"
            return "unknown_round", f"no round {msg.round} is running"
        if worker not in rnd.participants:
            return "not_participant", f"{worker} was not asked to contribute to round {rnd.number}"
        if msg.version != rnd.version:
            return "stale_version", f"computed against version {msg.version}, round {rnd.number} uses {rnd.version}"
        if msg.key != f"{worker}/{job.spec.id}/{rnd.number}":
            return "bad_key", f"idempotency key {msg.key!r} does not match sender, job and round"
        if worker in rnd.answered:
            return "duplicate", f"an update for {msg.key} was already applied or refused"
        if msg.meta["kind"] != self.kind:
            return "wrong_kind", f"rule {job.spec.rule} needs {self.kind} updates, got {msg.meta['kind']}"
        if set(msg.tensors) != set(self._template):
            missing = sorted(set(self._template) - set(msg.tensors))[:3]
            extra = sorted(set(msg.tensors) - set(self._template))[:3]
            return "shape_mismatch", f"tensor names differ from the model (missing {missing}, unexpected {extra})"
        for name, (shape, dtype) in self._template.items():
            t = msg.tensors[name]
            if t.shape != shape or not t.dtype.is_floating_point:
                return "shape_mismatch", f"tensor {name!r} is {list(t.shape)} {t.dtype}, the model has {list(shape)} {dtype}"
        return None

    def _nack(self, msg: Message, reason: str, detail: str) -> Message:
        log.warning("update rejected job=%s sender=%s reason=%s detail=%s", self.job.spec.id, msg.sender, reason, detail)
        self.notify("elastic_update_rejected", job_id=self.job.spec.id, worker_id=msg.sender, reason=reason, detail=detail)
        return Message(MsgType.NACK, job=msg.job, round=msg.round, version=msg.version, key=msg.key, meta={"reason": reason, "detail": detail})

    def on_worker_failed(self, worker: str, round_: int, detail: str) -> None:
        """A participant said it cannot do the work: stop waiting for it."""
        rnd = self.current
        if rnd is not None and rnd.number == round_ and worker in rnd.participants:
            log.warning("worker could not do its work job=%s worker=%s detail=%s", self.job.spec.id, worker, detail)
            if self.rendezvous:
                self.benched.add(worker)
                log.warning("worker sits out the next generations job=%s worker=%s (it may leave and join again)", self.job.spec.id, worker)
            self._drop(worker)

    def on_member_left(self, worker: str) -> None:
        """A member left: a round never waits on a worker that is gone."""
        self.benched.discard(worker)  # coming back gives it another chance
        if self.current is not None and worker in self.current.participants:
            self._drop(worker)

    def _drop(self, worker: str) -> None:
        rnd = self.current
        assert rnd is not None
        if worker in rnd.answered:
            return
        rnd.participants.discard(worker)
        if self.rendezvous:  # its shard would be missing from this step
            self._close(f"{worker} left generation {self.generation}; re-running with the next", force_abandon=True)
        elif rnd.complete:
            self._close("every remaining participant answered")

    # ------------------------------------------------------------ committing --

    def _close(self, why: str, force_abandon: bool = False) -> None:
        job, rnd = self.job, self.current
        assert rnd is not None
        self.current = None
        if self.rendezvous and not force_abandon and rnd.updates < rnd.asked:
            force_abandon, why = True, f"{why}: {rnd.asked - rnd.updates} shard(s) of generation {self.generation} missing"
        if force_abandon or rnd.updates < job.spec.min_workers:
            reason = why if force_abandon else f"{why} with {rnd.updates} update(s), fewer than min_workers={job.spec.min_workers}"
            log.warning("round abandoned job=%s round=%d reason=%s", job.spec.id, rnd.number, reason)
            job.aggregator.begin_round()  # drop the partial aggregate
            self.notify("elastic_round_abandoned", job_id=job.spec.id, round=rnd.number, reason=reason)
            return
        verdict = self.fence()
        if verdict is not True:
            self.fenced = verdict is False
            reason = "another coordinator leads" if self.fenced else "leadership not confirmed (etcd silent)"
            log.warning("round not committed job=%s round=%d reason=%s", job.spec.id, rnd.number, reason)
            job.aggregator.begin_round()
            self.notify("elastic_round_abandoned", job_id=job.spec.id, round=rnd.number, reason=reason)
            return
        if not self.model_sends.free:  # e.g. a frozen straggler has not read its WORK
            log.info("model memory still being sent job=%s round=%d: moving the model to a copy", job.spec.id, rnd.number)
            move_to_fresh_memory(job.model)
            self.model_sends = BufferSet({}, busy=False)
        job.aggregator.finalize()
        job.round, job.version = rnd.number, job.version + 1
        job.totals["bytes_sent"] += rnd.bytes_sent
        job.totals["bytes_received"] += rnd.bytes_received
        metrics: dict[str, Any] = {
            "round": rnd.number,
            "version": job.version,
            "loss": rnd.loss_sum / rnd.samples if rnd.samples else float("nan"),
            "updates": rnd.updates,
            "asked": rnd.asked,
            "participants": len(rnd.participants),
            "members": self.members_now,
            "generation": self.generation,
            "samples": rnd.samples,
            "seconds": round(self.clock() - rnd.started, 4),
            "bytes_sent": rnd.bytes_sent,
            "bytes_received": rnd.bytes_received,
        }
        spec = job.spec
        last = rnd.number >= spec.rounds
        if last or (spec.eval_every and rnd.number % spec.eval_every == 0):
            metrics.update(job.evaluate())
        job.history.append(metrics)
        if last:
            job.state = JobState.FINISHED
            job.final_metrics = {k: v for k, v in metrics.items() if k in ("loss", "eval_loss", "accuracy")} | {"rounds": job.round}
        if last or rnd.number % spec.checkpoint.every == 0:
            try:
                path = job.checkpoint(self.fence)
                self.notify("elastic_checkpoint_saved", job_id=spec.id, round=rnd.number, path=str(path))
            except Fenced as exc:  # leadership unsure between the fence and the publish
                log.error("checkpoint not published job=%s round=%d: %s", spec.id, rnd.number, exc)
                if self.fence() is False:  # another leader: stop here, publish nothing more
                    self.fenced = True
                    return
                # else etcd is only silent: the next checkpoint will carry this version
        log.info("round committed job=%s round=%d version=%d updates=%d loss=%.4f%s", spec.id, rnd.number, job.version, rnd.updates, metrics["loss"], "".join(f" {k}={metrics[k]:.4f}" for k in ("eval_loss", "accuracy") if k in metrics))
        self.notify("elastic_round_completed", job_id=spec.id, round=rnd.number, version=job.version, metrics=metrics)
        if last:
            self._finish()
        else:
            self._write_status()

    def _finish(self) -> None:
        job = self.job
        job.state = JobState.FINISHED
        path = job.save_final_model()
        final = job.final_metrics | {"model": str(path), "wall_seconds": round(job.wall_seconds(), 3)}
        log.info("job finished job=%s rounds=%d %s", job.spec.id, job.round, " ".join(f"{k}={v}" for k, v in final.items()))
        self.notify("elastic_job_finished", job_id=job.spec.id, state=str(job.state), metrics=final)
        self._write_status()

    def _write_status(self) -> None:
        extra = {}
        if self.current is not None:
            extra["in_progress"] = {"round": self.current.number, "participants": sorted(self.current.participants), "answered": sorted(self.current.answered)}
        status = self.job.status(self.members_now, extra)
        self.job.write_status(status)
        if self.on_status is not None:
            self.on_status(status)
