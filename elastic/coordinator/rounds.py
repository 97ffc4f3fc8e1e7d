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

With virtual clients (``[job] clients``) the clients are not the processes: each
round samples clients (``sampling.py``), spreads them over the members, and each
member trains its clients one after another from the round's model, sending each
client's update on its own (a rule sees every client's update, as it would with a
process per client). A member has answered once each of its clients has.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from elastic.coordinator.downlink import Downlink
from elastic.coordinator.engine import Engine, Outgoing
from elastic.coordinator.sampling import local_work, sample_clients, spread
from elastic.coordinator.threads import every_core
from elastic.coordinator.uploads import Part
from elastic.coordinator.validation import MAX_TRAIN_METRICS, Refusal, check_train_metrics
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
    # Virtual clients: each member's clients still to answer, and the clients folded.
    pending: dict[str, set[int]] = field(default_factory=dict)
    trained: list[int] = field(default_factory=list)
    # A task's own loop's extra figures: per name, the sum weighted by samples, and the samples.
    metric_sums: dict[str, list[float]] = field(default_factory=dict)
    # The updates are in and the rule is still asking (``Aggregator.closing``): the
    # round commits once it is settled, or is abandoned at its (new) deadline.
    settling: bool = False

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
        self._outbox: list[Outgoing] = []  # what the rule said between turns (EXCHANGE)
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
            return self._take_outbox()
        if self.current is not None:
            rnd = self.current
            said = job.aggregator.poll(now, {m.id for m in members})
            self._outbox.extend(self._said(rnd.number, said))
            if rnd.settling:
                self._settle(give_up=now >= rnd.deadline)
            elif now >= rnd.deadline:
                late = sorted(rnd.participants - rnd.answered)
                log.warning(
                    "round deadline passed job=%s round=%d missing=%s",
                    job.spec.id,
                    rnd.number,
                    ",".join(late),
                )
                self._close("deadline passed")
            return self._take_outbox()
        if self._too_few(members) or not self.ctx.holds():
            return self._take_outbox()
        return self._take_outbox() + self._start(members, now)

    def _take_outbox(self) -> list[Outgoing]:
        """What the rule said since the last turn; its bytes are the round's."""
        out, self._outbox = self._outbox, []
        if self.current is not None:
            self.current.bytes_sent += sum(len(msgpack.packb(o.message.meta["data"])) for o in out)
        return out

    def _start(self, members: list[Member], now: float) -> list[Outgoing]:
        job, spec = self.job, self.job.spec
        job.mark_running()
        number = job.round + 1
        chosen, work = self._choose(members, number)
        if not self.rendezvous and not spec.clients:
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
            asked=sum(len(w) for w in work.values()) if spec.clients else len(chosen),
            pending={w: set(clients) for w, clients in work.items()} if spec.clients else {},
        )
        out = []
        for rank, m in enumerate(chosen):
            if self.rendezvous:
                shard = [rank, len(chosen)]
            else:  # (with virtual clients, each client's shard is in ``clients``)
                first = min(work[m.id]) if spec.clients else m.slot % spec.shard_count
                shard = [first, spec.shard_count]
            msg = self._work(m.id, number, shard, snapshot)
            if spec.clients:
                msg.meta["clients"] = [[c, e] for c, e in sorted(work[m.id].items())]
            elif work[m.id] != spec.train.local_epochs:  # a straggler
                msg.meta["epochs"] = work[m.id]
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
        out.extend(
            self._said(number, job.aggregator.round_started(number, sorted(rnd.participants)))
        )
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

    def _choose(self, members: list[Member], number: int) -> tuple[list[Member], dict[str, Any]]:
        """The round's participants (by slot) and the work of each: its local epochs,
        or with virtual clients its clients and theirs."""
        spec = self.job.spec
        if spec.clients:  # every member serves; the clients are sampled
            chosen = sorted(members, key=lambda m: m.slot)[: spec.max_workers or None]
            epochs = local_work(spec, number, sample_clients(spec, number), keep=spec.min_workers)
            served = spread(sorted(epochs), [m.id for m in chosen])
            return [m for m in chosen if m.id in served], {
                w: {c: epochs[c] for c in clients} for w, clients in served.items()
            }
        count = max(spec.min_workers, math.ceil(spec.fraction * len(members)))
        if spec.max_workers:
            count = min(count, spec.max_workers)
        chosen = sorted(
            random.Random(spec.seed * 1_000_003 + number).sample(members, min(count, len(members))),
            key=lambda m: m.slot,
        )
        epochs = local_work(spec, number, range(len(chosen)), keep=spec.min_workers)
        return [m for i, m in enumerate(chosen) if i in epochs], {
            m.id: epochs[i] for i, m in enumerate(chosen) if i in epochs
        }

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

    def on_exchange(self, worker: str, msg: Message) -> Message | None:
        """A participant's step in the rule's conversation: the rule answers."""
        rnd = self.current
        if rnd is None or msg.round != rnd.number or worker not in rnd.participants:
            return self._nack(
                msg, Refusal("late", f"round {msg.round} is not running with {worker} in it")
            )
        try:
            said = self.job.aggregator.exchange(worker, msg.meta["stage"], msg.meta["data"])
        except ValueError as exc:
            return self._nack(msg, Refusal("bad_exchange", str(exc)))
        rnd.bytes_received += len(msgpack.packb(msg.meta["data"]))
        self._outbox.extend(self._said(rnd.number, said))
        if rnd.settling:
            self._settle(give_up=False)
        return None

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
        if rnd.pending:
            client = msg.meta["client"]
            rnd.trained.append(client)
            self._client_done(worker, client)
        else:
            rnd.answered.add(worker)
        rnd.updates += 1
        rnd.samples += samples
        loss = float(msg.meta["loss"])
        if math.isfinite(loss):
            rnd.loss_sum += loss * samples
        rnd.train_seconds_max = max(
            rnd.train_seconds_max, float(msg.meta.get("train_seconds", 0.0))
        )
        for name, value in msg.meta.get("metrics", {}).items():  # checked by ``_refuse``
            if name not in rnd.metric_sums and len(rnd.metric_sums) >= MAX_TRAIN_METRICS:
                continue  # the round's history stays bounded whatever clients send
            sums = rnd.metric_sums.setdefault(name, [0.0, 0.0])
            sums[0] += float(value) * samples
            sums[1] += samples
        job.totals["updates"] += 1
        if rnd.complete:
            self._close("all participants answered")
        return Message(
            MsgType.ACK, job=job.spec.id, round=msg.round, version=msg.version, key=msg.key
        )

    def abandon_parts(self, worker: str, key: str) -> None:
        """What came of the update stays folded; the round no longer waits for it (a
        late part of an earlier round changes nothing)."""
        rnd = self.current
        if rnd is None or worker not in rnd.participants:
            return
        client = self._client_of(worker, key)
        if key == self._key(worker, rnd.number) or client is not None:
            log.warning(
                "update in parts given up job=%s worker=%s round=%d%s: the parts that came stay "
                "folded",
                self.job.spec.id,
                worker,
                rnd.number,
                f" client={client}" if client is not None else "",
            )
            if client is not None:
                self._client_given_up(worker, client)
            else:
                self._drop(worker)

    def _client_of(self, worker: str, key: str) -> int | None:
        """The client of this round's ``worker`` whose update ``key`` names, if any."""
        rnd = self.current
        if rnd is None:
            return None
        for client in rnd.pending.get(worker, ()):
            if key == self._key(worker, rnd.number, client):
                return client
        return None

    def _client_done(self, worker: str, client: int) -> None:
        """One of ``worker``'s clients answered (or will not): the worker has, once
        all of its clients have."""
        rnd = self.current
        assert rnd is not None
        pending = rnd.pending.get(worker, set())
        pending.discard(client)
        if not pending:
            rnd.answered.add(worker)

    def _client_given_up(self, worker: str, client: int) -> None:
        """No update will come for this client: the round waits for the others."""
        self._client_done(worker, client)
        if self.current is not None and self.current.complete:
            self._close("every remaining participant answered")

    def _refuse(self, worker: str, msg: Message) -> Refusal | None:
        """What only the engine knows: whether this round asked this worker for it."""
        job, rnd = self.job, self.current
        if job.done:
            return Refusal("job_done", f"job {job.spec.id} is {job.state}")
        if rnd is not None and rnd.settling and msg.round == rnd.number:
            return Refusal("late", f"round {msg.round} is closing: its updates are in")
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
        if rnd.pending:
            refusal = self._refuse_client(worker, msg)
        elif msg.key != self._key(worker, rnd.number):
            refusal = Refusal(
                "bad_key", f"idempotency key {msg.key!r} does not match sender, job and round"
            )
        elif worker in rnd.answered:
            refusal = Refusal(
                "duplicate", f"an update for {msg.key} was already applied or refused"
            )
        else:
            refusal = None
        return refusal or check_train_metrics(msg)

    def _refuse_client(self, worker: str, msg: Message) -> Refusal | None:
        """With virtual clients: whether this round asked ``worker`` for this client."""
        rnd = self.current
        assert rnd is not None
        client = msg.meta.get("client")
        if client is None:
            return Refusal(
                "not_participant",
                f"job {self.job.spec.id} has virtual clients: an update names its client",
            )
        if msg.key != self._key(worker, rnd.number, client):
            return Refusal(
                "bad_key",
                f"idempotency key {msg.key!r} does not match sender, job, round and client",
            )
        if client not in rnd.pending.get(worker, ()):
            if client in rnd.trained:
                return Refusal("duplicate", f"an update for {msg.key} was already applied")
            return Refusal(
                "not_participant",
                f"{worker} was not asked to train client {client} in round {rnd.number}",
            )
        return None

    def on_worker_failed(self, worker: str, round_: int, detail: str, key: str = "") -> None:
        """A participant said it cannot do the work (``key``: the update it could not
        make; with virtual clients, one client's): stop waiting for it."""
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
            client = self._client_of(worker, key)
            if client is not None and not detail.startswith("task_unavailable"):
                self._client_given_up(worker, client)  # its other clients go on
                return
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
        if worker in rnd.answered or rnd.settling:  # (the rule sees who left: ``poll``)
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
            self._abandon(
                rnd,
                why
                if force_abandon
                else f"{why} with {rnd.updates} update(s), fewer than "
                f"min_workers={job.spec.min_workers}",
            )
            return
        said = job.aggregator.closing(sorted(rnd.answered))
        if isinstance(said, str):
            self._abandon(rnd, said)
            return
        if said:  # the rule asks more of the participants before it can finalize
            rnd.settling = True
            rnd.deadline = self.clock() + job.spec.round_timeout
            self.current = rnd
            self._outbox.extend(self._said(rnd.number, said))
            return
        self._commit_round(rnd)

    def _settle(self, give_up: bool) -> None:
        """A settling round commits when the rule says it may, or is abandoned."""
        rnd = self.current
        assert rnd is not None and rnd.settling
        verdict = self.job.aggregator.settled(give_up)
        if verdict is False:
            return
        self.current = None
        if verdict is True:
            self._commit_round(rnd)
        else:
            self._abandon(rnd, str(verdict))

    def _abandon(self, rnd: _Round, reason: str) -> None:
        job = self.job
        log.warning("round abandoned job=%s round=%d reason=%s", job.spec.id, rnd.number, reason)
        job.aggregator.begin_round()  # drop the partial aggregate
        self.ctx.notify(
            "elastic_round_abandoned", job_id=job.spec.id, round=rnd.number, reason=reason
        )

    def _commit_round(self, rnd: _Round) -> None:
        job = self.job
        self.job.totals["bytes_sent"] += rnd.bytes_sent
        self.job.totals["bytes_received"] += rnd.bytes_received
        committed = self._commit(
            rnd.number,
            {
                **{  # first: a task's figure never hides the round's own
                    f"train_{name}": total / weight if weight else float("nan")
                    for name, (total, weight) in rnd.metric_sums.items()
                },
                "loss": rnd.loss_sum / rnd.samples if rnd.samples else float("nan"),
                "updates": rnd.updates,
                "asked": rnd.asked,
                "participants": len(rnd.participants),
                "generation": self.generation,
                "samples": rnd.samples,
                **({"clients": sorted(rnd.trained)} if job.spec.clients else {}),
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

    @property
    def in_flight(self) -> bool:
        return self.current is not None

    @property
    def deadline(self) -> float | None:
        return self.current.deadline if self.current is not None else None

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
