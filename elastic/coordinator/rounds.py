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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from elastic.coordinator.downlink import Downlink
from elastic.coordinator.engine import Engine, Outgoing
from elastic.coordinator.threads import every_core
from elastic.coordinator.uploads import Part
from elastic.coordinator.validation import Refusal
from elastic.membership.base import Member
from elastic.wire.buffers import BufferSet
from elastic.wire.header import Message, MsgType
from elastic.wire.tensors import WireTensor

__all__ = ["RoundEngine", "Outgoing"]

log = logging.getLogger("elastic.rounds")


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
    train_seconds_max: float = 0.0  # the slowest participant's own compute: the rest was the system

    @property
    def complete(self) -> bool:
        return self.participants <= self.answered


class RoundEngine(Engine):
    """Drives one job's synchronous rounds."""

    folds_parts = True
    workers_wait = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.current: _Round | None = None
        self.rendezvous = self.mode == "gradient"
        # Workers whose work failed in a generation: each failure re-runs the step, so
        # they sit out (until they leave and join again) instead of stalling the job.
        self.benched: set[str] = set()
        self._generation_members: tuple[str, ...] = ()
        self._served_warned = -1  # the number of served shards last warned about
        self.downlink: Downlink | None = None
        if self.job.model_chain:
            self.downlink = Downlink(
                self.job.model, self.job.model_chain, share=self.ctx.local is not None
            )
        elif (
            self.ctx.local is not None and self.mode == "gradient"
        ):  # workers on this host take gradients on a shared copy
            self.downlink = Downlink(self.job.model, self.job.model_chain, share=True)

    # -------------------------------------------------------------- driving --

    def tick(self, members: list[Member]) -> list[Outgoing]:
        """Start a round when none runs and enough members exist; enforce deadlines."""
        self.publisher.flush()
        job = self.job
        self.members_now = len(members)
        if job.done or self.fenced:
            return []
        if self.benched:  # they sit out until they leave and come back
            members = [m for m in members if m.id not in self.benched]
        now = self.clock()
        if self.current is None and (self._finish_if_due() or self._pause_if_asked(idle=True)):
            return []
        if self.current is not None:
            if now >= self.current.deadline:
                late = sorted(self.current.participants - self.current.answered)
                log.warning(
                    "round deadline passed job=%s round=%d missing=%s",
                    job.spec.id,
                    self.current.number,
                    ",".join(late),
                )
                self._close("deadline passed")
            return []
        if self._too_few(members) or not self.ctx.holds():
            return []
        return self._start(members, now)

    def _start(self, members: list[Member], now: float) -> list[Outgoing]:
        job, spec = self.job, self.job.spec
        job.mark_running()
        number = job.round + 1
        count = max(spec.min_workers, math.ceil(spec.fraction * len(members)))
        if spec.max_workers:
            count = min(count, spec.max_workers)
        chosen = sorted(
            random.Random(spec.seed * 1_000_003 + number).sample(members, min(count, len(members))),
            key=lambda m: m.slot,
        )
        if not self.rendezvous:
            self._warn_unserved(members)
        if self.rendezvous and tuple(m.id for m in chosen) != self._generation_members:
            self._generation_members = tuple(m.id for m in chosen)
            self.generation += 1
            log.info(
                "new generation job=%s generation=%d members=%s",
                spec.id,
                self.generation,
                ",".join(self._generation_members),
            )
        state = job.model.state_dict()
        snapshot = {k: WireTensor.from_tensor(v) for k, v in state.items()}
        local = self.ctx.local or (lambda _: False)
        downlink = self.downlink
        if downlink is not None and (not downlink.exact or any(local(m.id) for m in chosen)):
            # (a delta is kept only if someone may be sent it)
            wire = any(not local(m.id) or m.id in downlink.wire_only for m in members)
            with every_core():  # the round's participants wait for its model
                downlink.advance(job.model, job.version, wire=wire)
        rnd = _Round(
            number,
            job.version,
            {m.id for m in chosen},
            now,
            now + spec.round_timeout,
            asked=len(chosen),
        )
        out = []
        for rank, m in enumerate(chosen):
            shard = (
                [rank, len(chosen)]
                if self.rendezvous
                else [m.slot % spec.shard_count, spec.shard_count]
            )
            msg = self._work(m.id, number, shard, snapshot)
            sends: BufferSet | None = self.committer.model_sends
            here = local(m.id)
            if downlink is not None and downlink.serves(
                m.id, here
            ):  # the reference, or a delta against what it holds
                msg.tensors, msg.encodings, extra = downlink.work(m.id, state, local=here)
                msg.meta.update(extra)
                # A shared reference is never sent from its own memory (deltas are
                # new memory, whole sends a copy): nothing to track.
                sends = None if downlink.reference_is_shared else downlink.sends
            out.append(Outgoing(m.id, msg, sends))
            rnd.bytes_sent += msg.payload_bytes
        self.current = rnd
        job.aggregator.begin_round()
        log.info(
            "round started job=%s round=%d version=%d participants=%d",
            spec.id,
            number,
            job.version,
            len(chosen),
        )
        self.ctx.notify(
            "elastic_round_started",
            job_id=spec.id,
            round=number,
            version=job.version,
            participants=sorted(rnd.participants),
        )
        self.publisher.write()
        return out

    def _warn_unserved(self, members: list[Member]) -> None:
        """A train-mode shard is its slot's: say so when some shards have no member
        (once for each number of them), or part of the data is silently never used."""
        count = self.job.spec.shard_count
        served = len({m.slot % count for m in members})
        if served < count and served != self._served_warned:
            self._served_warned = served
            log.warning(
                "shards without a worker job=%(job)s shards=%(count)d served=%(served)d: "
                "%(missing)d of the %(count)d data shards (partitions) get no training; "
                "start %(missing)d more workers, or lower partitions",
                {
                    "job": self.job.spec.id,
                    "count": count,
                    "served": served,
                    "missing": count - served,
                },
            )

    def _abandon_work(self, why: str) -> None:
        if self.current is not None:
            self._close(why, force_abandon=True)

    # -------------------------------------------------------------- updates --

    def on_update(self, worker: str, msg: Message) -> Message:
        """Validate and fold an update; the answer is an ACK or a NACK with the reason."""
        wire_bytes = msg.payload_bytes  # as sent: compressed updates expand while checked
        refusal = self._refuse(worker, msg)
        update = refusal or self.validator.check(worker, msg, wire_bytes)
        if isinstance(update, Refusal):
            return self._nack(msg, update)
        error = self._fold(msg, lambda: self.job.aggregator.accumulate(update))
        if error is not None:
            return self._nack(
                msg, Refusal("aggregator_error", f"the rule failed on this update: {error}")
            )
        assert self.current is not None
        self.current.bytes_received += wire_bytes
        return self._folded(
            worker,
            msg,
            update.num_samples,
            wire_bytes,
            sum(t.nbytes for t in update.tensors.values()),
        )

    def on_update_part(self, worker: str, msg: Message, part: Part) -> Message | None:
        """Validate and fold one part of an update (``elastic.wire.parts``; the core
        has checked it is the part due): None while more are to come, else the ACK or
        NACK of the whole. A worker that stops halfway leaves the parts it sent
        folded, each weighed by the updates that reached it, and the round does not
        wait for it."""
        rnd = self.current
        refusal = self._refuse(worker, msg)
        update = refusal or self.validator.check_part(worker, msg, part.segments, part.first)
        if isinstance(update, Refusal):
            if not part.first:
                self.abandon_parts(worker, msg.key)
            return self._nack(msg, update)
        error = self._fold(msg, lambda: self.job.aggregator.accumulate_part(update, part.segments))
        if error is not None:
            return self._nack(
                msg,
                Refusal("aggregator_error", f"the rule failed on a part of this update: {error}"),
            )
        assert rnd is not None
        rnd.bytes_received += (
            msg.payload_bytes
        )  # a part folded is received, whether or not the rest comes
        if not part.last:
            return None
        sent = part.before + msg.payload_bytes
        return self._folded(worker, msg, update.num_samples, sent, sent)

    def _fold(self, msg: Message, fold: Callable[[], None]) -> str | None:
        """Run the rule's fold; the error, if it failed: a half-folded update would
        taint the round, so it runs again."""
        try:
            fold()
        except Exception as exc:
            log.exception("aggregator failed job=%s worker=%s", self.job.spec.id, msg.sender)
            self._close(f"aggregator error: {exc}", force_abandon=True)
            return str(exc)
        return None

    def _folded(
        self, worker: str, msg: Message, samples: int, wire_bytes: int, raw_bytes: int
    ) -> Message:
        """The bookkeeping of an update folded whole (or its last part): ``wire_bytes``
        as sent, ``raw_bytes`` as decoded, the whole update's."""
        job, rnd = self.job, self.current
        assert rnd is not None
        log.debug(
            "update folded job=%s worker=%s round=%d key=%s samples=%d bytes=%d",
            job.spec.id,
            worker,
            rnd.number,
            msg.key,
            samples,
            wire_bytes,
        )
        self._count_update(wire_bytes, raw_bytes)
        rnd.answered.add(worker)
        rnd.updates += 1
        rnd.samples += samples
        loss = float(msg.meta["loss"])
        if math.isfinite(loss):
            rnd.loss_sum += loss * samples
        rnd.train_seconds_max = max(
            rnd.train_seconds_max, float(msg.meta.get("train_seconds", 0.0))
        )
        job.totals["updates"] += 1
        if rnd.complete:
            self._close("all participants answered")
        return Message(
            MsgType.ACK, job=job.spec.id, round=msg.round, version=msg.version, key=msg.key
        )

    def abandon_parts(self, worker: str, key: str) -> None:
        """What came of the update stays folded; the round no longer waits for it (a
        late part of an earlier round changes nothing)."""
        if (
            self.current is not None
            and key == self._key(worker, self.current.number)
            and worker in self.current.participants
        ):
            log.warning(
                "update in parts given up job=%s worker=%s round=%d: the parts that came stay "
                "folded",
                self.job.spec.id,
                worker,
                self.current.number,
            )
            self._drop(worker)

    def _refuse(self, worker: str, msg: Message) -> Refusal | None:
        """What only the engine knows: whether this round asked this worker for it."""
        job, rnd = self.job, self.current
        if job.done:
            return Refusal("job_done", f"job {job.spec.id} is {job.state}")
        if rnd is None or msg.round != rnd.number:
            if msg.round <= job.round:
                return Refusal(
                    "late", f"round {msg.round} is closed; the model is at version {job.version}"
                )
            return Refusal("unknown_round", f"no round {msg.round} is running")
        if worker not in rnd.participants:
            return Refusal(
                "not_participant", f"{worker} was not asked to contribute to round {rnd.number}"
            )
        if msg.version != rnd.version:
            return Refusal(
                "stale_version",
                f"computed against version {msg.version}, round {rnd.number} uses {rnd.version}",
            )
        if msg.key != self._key(worker, rnd.number):
            return Refusal(
                "bad_key", f"idempotency key {msg.key!r} does not match sender, job and round"
            )
        if worker in rnd.answered:
            return Refusal("duplicate", f"an update for {msg.key} was already applied or refused")
        return None

    def on_worker_failed(self, worker: str, round_: int, detail: str) -> None:
        """A participant said it cannot do the work: stop waiting for it."""
        rnd = self.current
        model_missing = detail.startswith(
            ("need_full_model", "no_shared_reference")
        )  # that one gets it next time
        if self.downlink is not None:  # e.g. it did not hold the version the delta was against
            self.downlink.forget(worker, unreadable=detail.startswith("no_shared_reference"))
        if rnd is not None and rnd.number == round_ and worker in rnd.participants:
            log.warning(
                "worker could not do its work job=%s worker=%s detail=%s",
                self.job.spec.id,
                worker,
                detail,
            )
            # Its task will not load until it is restarted; a failed gradient
            # step would re-run the generation again and again.
            if detail.startswith("task_unavailable") or (self.rendezvous and not model_missing):
                self.benched.add(worker)
                log.warning(
                    "worker sits out the next rounds job=%s worker=%s (it may leave and join "
                    "again)",
                    self.job.spec.id,
                    worker,
                )
            self._drop(worker)

    def on_member_left(self, worker: str) -> None:
        """A member left: a round never waits on a worker that is gone."""
        self.benched.discard(worker)  # coming back gives it another chance
        if self.downlink is not None:
            self.downlink.left(worker)
        if self.current is not None and worker in self.current.participants:
            self._drop(worker)

    def close(self) -> None:
        if self.downlink is not None:
            self.downlink.close()

    def _drop(self, worker: str) -> None:
        rnd = self.current
        assert rnd is not None
        if worker in rnd.answered:
            return
        rnd.participants.discard(worker)
        if self.rendezvous:  # its shard would be missing from this step
            self._close(
                f"{worker} left generation {self.generation}; re-running with the next",
                force_abandon=True,
            )
        elif rnd.complete:
            self._close("every remaining participant answered")

    # ------------------------------------------------------------ committing --

    def _close(self, why: str, force_abandon: bool = False) -> None:
        job, rnd = self.job, self.current
        assert rnd is not None
        self.current = None
        if self.rendezvous and not force_abandon and rnd.updates < rnd.asked:
            force_abandon, why = (
                True,
                f"{why}: {rnd.asked - rnd.updates} shard(s) of generation {self.generation} "
                "missing",
            )
        if force_abandon or rnd.updates < job.spec.min_workers:
            reason = (
                why
                if force_abandon
                else f"{why} with {rnd.updates} update(s), fewer than "
                f"min_workers={job.spec.min_workers}"
            )
            log.warning(
                "round abandoned job=%s round=%d reason=%s", job.spec.id, rnd.number, reason
            )
            job.aggregator.begin_round()  # drop the partial aggregate
            self.ctx.notify(
                "elastic_round_abandoned", job_id=job.spec.id, round=rnd.number, reason=reason
            )
            return
        self.job.totals["bytes_sent"] += rnd.bytes_sent
        self.job.totals["bytes_received"] += rnd.bytes_received
        committed = self._commit(
            rnd.number,
            {
                "loss": rnd.loss_sum / rnd.samples if rnd.samples else float("nan"),
                "updates": rnd.updates,
                "asked": rnd.asked,
                "participants": len(rnd.participants),
                "generation": self.generation,
                "samples": rnd.samples,
                "seconds": round(self.clock() - rnd.started, 4),
                "train_seconds_max": round(rnd.train_seconds_max, 4),
                "bytes_sent": rnd.bytes_sent,
                "bytes_received": rnd.bytes_received,
            },
        )
        if committed is not True:
            job.aggregator.begin_round()  # the round is run again (or never, if fenced)

    def _base_weights(self) -> Mapping[str, torch.Tensor]:
        if (
            self.downlink is not None
            and not self.downlink.exact
            and self.downlink.reference is not None
        ):
            return self.downlink.reference  # what the workers trained from
        return super()._base_weights()

    def _in_progress(self) -> dict[str, Any]:
        if self.current is None:
            return {}
        rnd = self.current
        return {
            "in_progress": {
                "round": rnd.number,
                "participants": sorted(rnd.participants),
                "answered": sorted(rnd.answered),
            }
        }
