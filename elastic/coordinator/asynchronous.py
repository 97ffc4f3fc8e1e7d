"""The asynchronous engine of one job: no rounds, no waiting for the slowest worker.

Every idle member is given work: the current model and its version (an
*assignment*, numbered in ``round``). Its update comes back computed against that
version; its staleness is how far the model has moved since. Too stale (beyond the
rule's ``max_staleness``): a NACK saying so, and the worker is sent the current
model. Otherwise the rule folds it in at once, and when the rule is ``ready()`` the
engine commits a new version. Each assignment is answered at most once (it is
closed on the first answer), so no update is ever applied twice. Either way the
worker gets fresh work on the next tick: a worker pulls the model as soon as it is
ready, which is what makes a slow worker cost nothing to the others.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from elastic.coordinator.engine import Engine, Outgoing
from elastic.coordinator.job import JobState
from elastic.coordinator.validation import Refusal
from elastic.membership.base import Member
from elastic.rules import AsyncAggregator
from elastic.wire.header import Message, MsgType
from elastic.wire.tensors import WireTensor

__all__ = ["AsyncEngine"]

log = logging.getLogger("elastic.rounds")
RETRY_COMMIT = 1.0  # seconds between commit attempts while leadership is unconfirmed


@dataclass
class _Assignment:
    number: int
    version: int
    deadline: float


@dataclass
class _Buffer:
    """What has been folded into the rule since the last version."""

    started: float
    updates: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    staleness_sum: int = 0
    staleness_max: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class AsyncEngine(Engine):
    """Drives a job whose rule is an ``AsyncAggregator``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.job.aggregator, AsyncAggregator):
            raise TypeError(f"rule {self.job.spec.rule} is not asynchronous")
        self.rule: AsyncAggregator = self.job.aggregator
        self.assigned: dict[str, _Assignment] = {}
        self._next_expiry = float("-inf")  # when assignments are next checked for their deadlines
        self._answered: set[str] = set()  # workers whose assignment ended since the last tick
        self._member_by_id: dict[str, Member] = {}  # the members at the last full look
        self._rescan = True
        self._work_tensors: tuple[int, dict[str, WireTensor]] | None = (
            None  # (version, the model as sent)
        )
        # Workers whose work failed: they sit out until they leave and join again,
        # rather than being sent the model over and over.
        self.benched: set[str] = set()
        # Assignment numbers start at random so a worker's leftover answer to another
        # coordinator's assignment never matches one of ours.
        self._next = random.SystemRandom().randrange(1 << 31)
        self.buffer = _Buffer(self.clock())
        self._retry_commit_at: float | None = None
        self._started = self.clock()
        self._versions_here = 0
        totals = self.job.totals
        totals.setdefault("rejected_stale", 0)
        self.histogram: Counter[int] = Counter(
            {int(k): v for k, v in totals.get("staleness_histogram", {}).items()}
        )

    # -------------------------------------------------------------- driving --

    def tick(self, members: list[Member]) -> list[Outgoing]:
        """Give work to every idle member; expire assignments past the deadline."""
        self.publisher.flush()
        job, spec = self.job, self.job.spec
        self.members_now = len(members)
        if job.done or self.fenced:
            return []
        now = self.clock()
        if now >= self._next_expiry:  # deadlines are seconds away: no O(workers) scan on every turn
            self._next_expiry = now + min(1.0, spec.round_timeout / 10)
            for worker, task in list(self.assigned.items()):
                if now >= task.deadline:
                    log.warning(
                        "assignment deadline passed job=%s worker=%s assignment=%d",
                        spec.id,
                        worker,
                        task.number,
                    )
                    del self.assigned[worker]  # it gets the current model again below
                    self._answered.add(worker)
        if self._retry_commit_at is not None and now >= self._retry_commit_at:
            self._try_commit()
        if (
            self.finishing and self.buffer.updates and job.aggregator.exhausted() is None
        ):  # what is folded makes the last version
            if self._retry_commit_at is None:
                self._try_commit()
            return []
        if (
            self._finish_if_due()
            or self._pause_if_asked(idle=not self.assigned)
            or self._too_few(members)
            or not self.ctx.holds()
        ):
            return []
        if job.state is not JobState.RUNNING:
            job.mark_running()
            self.publisher.write()
        if self._rescan or len(members) != len(self._member_by_id):
            # Who is here changed: look at everyone. Else only at the workers that
            # answered since the last turn: with hundreds of members, a scan on every
            # turn of the loop costs more than the updates.
            self._rescan = False
            self._member_by_id = {m.id: m for m in members}
            candidates = list(members)
        else:
            candidates = [m for w in self._answered if (m := self._member_by_id.get(w)) is not None]
        self._answered.clear()
        idle = [m for m in candidates if m.id not in self.assigned and m.id not in self.benched]
        return [self._assign(m, now) for m in idle]

    def _assign(self, member: Member, now: float) -> Outgoing:
        job, spec = self.job, self.job.spec
        number, self._next = self._next, self._next + 1
        self.assigned[member.id] = _Assignment(number, job.version, now + spec.round_timeout)
        if (
            self._work_tensors is None or self._work_tensors[0] != job.version
        ):  # one view of the model per version
            self._work_tensors = (
                job.version,
                {k: WireTensor.from_tensor(v) for k, v in job.model.state_dict().items()},
            )
        tensors = self._work_tensors[1]
        msg = self._work(
            member.id, number, [member.slot % spec.shard_count, spec.shard_count], tensors
        )
        self.buffer.bytes_sent += sum(t.nbytes for t in tensors.values())
        return Outgoing(member.id, msg, self.committer.model_sends)

    # -------------------------------------------------------------- updates --

    def on_update(self, worker: str, msg: Message) -> Message:
        job = self.job
        if job.done:
            return self._nack(msg, Refusal("job_done", f"job {job.spec.id} is {job.state}"))
        task = self.assigned.get(worker)
        if task is None or msg.round != task.number:
            return self._nack(
                msg,
                Refusal(
                    "not_assigned",
                    f"no open assignment {msg.round} for {worker}: answered already, expired, or "
                    "never given",
                ),
            )
        if msg.key != self._key(worker, task.number) or msg.version != task.version:
            return self._nack(
                msg,
                Refusal(
                    "bad_key",
                    f"key {msg.key!r} at version {msg.version} does not match assignment "
                    f"{task.number} at version {task.version}",
                ),
            )
        del self.assigned[worker]  # answered: whatever the verdict, it gets fresh work next
        self._answered.add(worker)
        staleness = job.version - msg.version
        if staleness > self.rule.max_staleness:
            job.totals["rejected_stale"] += 1
            return self._nack(
                msg,
                Refusal(
                    "too_stale",
                    f"computed against version {msg.version}, the model is at {job.version}: "
                    f"staleness {staleness} > max_staleness {self.rule.max_staleness}; training "
                    "again on the current model",
                ),
            )
        wire_bytes = msg.payload_bytes  # as sent: compressed updates expand while checked
        update = self.validator.check(worker, msg, wire_bytes, staleness)
        if isinstance(update, Refusal):
            return self._nack(msg, update)
        try:
            self.rule.accumulate(update)
        except Exception as exc:  # a half-folded update would taint the buffer: drop it
            log.exception("aggregator failed job=%s worker=%s", job.spec.id, worker)
            self._abandon_buffer(f"aggregator error: {exc}")
            return self._nack(
                msg, Refusal("aggregator_error", f"the rule failed on this update: {exc}")
            )
        log.debug(
            "update folded job=%s worker=%s base_version=%d key=%s staleness=%d bytes=%d",
            job.spec.id,
            worker,
            msg.version,
            msg.key,
            staleness,
            wire_bytes,
        )
        self._count_update(wire_bytes, sum(t.nbytes for t in update.tensors.values()))
        buf = self.buffer
        buf.updates += 1
        buf.samples += update.num_samples
        if math.isfinite(update.loss):
            buf.loss_sum += update.loss * update.num_samples
        buf.staleness_sum += staleness
        buf.staleness_max = max(buf.staleness_max, staleness)
        buf.bytes_received += wire_bytes
        self.histogram[staleness] += 1
        job.totals["updates"] += 1
        job.totals["staleness_histogram"] = {str(k): v for k, v in sorted(self.histogram.items())}
        if self._retry_commit_at is None and self.rule.ready():
            self._try_commit()
        return Message(
            MsgType.ACK, job=job.spec.id, round=msg.round, version=msg.version, key=msg.key
        )

    @property
    def in_flight(self) -> bool:
        return bool(self.assigned)

    def on_worker_failed(self, worker: str, round_: int, detail: str, key: str = "") -> None:
        task = self.assigned.get(worker)
        if task is not None and task.number == round_:
            del self.assigned[worker]
            self.benched.add(worker)
            log.warning(
                "worker could not do its work job=%s worker=%s detail=%s; it sits out until it "
                "joins again",
                self.job.spec.id,
                worker,
                detail,
            )

    def on_member_left(self, worker: str) -> None:
        self._rescan = True
        self.assigned.pop(worker, None)
        self.benched.discard(worker)  # coming back gives it another chance

    # ------------------------------------------------------------ committing --

    def _try_commit(self) -> None:
        """A new version from the buffer; kept for a later try while leadership is unconfirmed."""
        buf, now = self.buffer, self.clock()
        self.job.totals["bytes_sent"] += buf.bytes_sent
        self.job.totals["bytes_received"] += buf.bytes_received
        buf.bytes_sent = buf.bytes_received = 0
        self.buffer = _Buffer(now)  # the status written on commit shows an empty buffer
        verdict = self._commit(
            self.job.round + 1,
            {
                "loss": buf.loss_sum / buf.samples if buf.samples else float("nan"),
                "updates": buf.updates,
                "samples": buf.samples,
                "staleness_mean": round(buf.staleness_sum / max(buf.updates, 1), 3),
                "staleness_max": buf.staleness_max,
                "seconds": round(now - buf.started, 4),
            },
        )
        if verdict is None:  # etcd silent: keep what was folded, try again soon
            self.buffer = buf
            self._retry_commit_at = now + RETRY_COMMIT
            return
        self._retry_commit_at = None
        if verdict:
            self._versions_here += 1
        self.rule.begin_round()

    def _abandon_buffer(self, why: str) -> None:
        log.warning(
            "updates dropped job=%s updates=%d reason=%s",
            self.job.spec.id,
            self.buffer.updates,
            why,
        )
        self.rule.begin_round()
        self.buffer = _Buffer(self.clock())
        self._retry_commit_at = None

    def _abandon_work(self, why: str) -> None:
        self._abandon_buffer(why)
        self.assigned.clear()
        self._rescan = True

    def _in_progress(self) -> dict[str, Any]:
        elapsed = self.clock() - self._started
        return {
            "async": {
                "assigned": sorted(self.assigned),
                "buffered": self.buffer.updates,
                "rejected_stale": self.job.totals["rejected_stale"],
                "staleness_histogram": {str(k): v for k, v in sorted(self.histogram.items())},
                "versions_per_second": round(self._versions_here / elapsed, 3)
                if elapsed > 0
                else 0.0,
            }
        }
