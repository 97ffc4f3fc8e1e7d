"""The coordinator's core: jobs, members, engines, uploads and the leadership term,
with no socket anywhere.

Events come in: a decoded message from a worker (``receive``), a message that could
not be decoded (``reject``), a peer that could not be reached (``unreachable``), the
passing of time (``tick``: membership, the job store, deadlines, rounds), a control
request (``ControlAPI`` over this core). Actions go out: the messages to send,
queued in ``outbox`` for whoever owns the sockets (``take``); status and checkpoint
files are written by the jobs themselves. The coordinator daemon is a shell around
it (sockets, CURVE, signals, metrics, sd_notify, reload), ``elastic simulate`` drives
the same core by hand, and so can a test.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

from elastic import __version__
from elastic.config import CoordinatorConfig
from elastic.coordinator.asynchronous import AsyncEngine
from elastic.coordinator.collective import CollectiveEngine
from elastic.coordinator.context import EngineContext, HostedStore
from elastic.coordinator.engine import Engine, Outgoing
from elastic.coordinator.job import Job
from elastic.coordinator.rounds import RoundEngine
from elastic.coordinator.uploads import Offer, UploadGate, UploadStream
from elastic.errors import ConfigError
from elastic.jobspec import JobSpec
from elastic.membership.base import Member, MemberTable
from elastic.membership.cluster import ClusterBackend, Election, JobStore
from elastic.plugins import Plugins
from elastic.rules import AsyncAggregator, CollectiveRule
from elastic.wire.header import Message, MsgType

__all__ = ["CoordinatorCore", "HostPeers"]

log = logging.getLogger("elastic.coordinator")

# The longest a joining worker's build of its jobs (WELCOME's ``jobs``) keeps it out of
# rounds: a task whose build hangs must not keep the worker out for good.
PREPARE_LIMIT = 300.0


class HostPeers(Protocol):
    """Which workers share this host's memory (``elastic.wire.shm.LocalPeers``): a
    transport's fact the core needs for its answers, not a socket."""

    enabled: bool

    def hello(self, peer: str, described: Any) -> bool: ...
    def is_local(self, peer: str) -> bool: ...
    def drop(self, peer: str) -> None: ...


class CoordinatorCore:
    """Everything a coordinator decides, driven by events, answering in ``outbox``.

    Args:
        config: the coordinator's settings (heartbeats, limits, upload sizes, state dir).
        plugins: rules, tasks, codecs and observers.
        backend: where members, the leader and jobs are kept.
        election: this coordinator's candidacy in ``backend`` (it must lead before
            ``begin_term``).
        peers: which workers share this host's memory.
        clock: monotonic seconds; a simulation gives its own.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        plugins: Plugins,
        backend: ClusterBackend,
        election: Election,
        peers: HostPeers,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.plugins = plugins
        self.backend = backend
        self.election = election
        self.peers = peers
        self.clock = clock
        self.outbox: list[Outgoing] = []
        self.engines: dict[str, Engine] = {}
        self.membership: MemberTable
        self.board: JobStore
        self.serving = False  # a term is on: members and jobs are loaded
        self.rejected: Counter[str] = Counter()
        self._published: dict[
            str, int
        ] = {}  # rendezvous generation last queued for the cluster, by job
        self.uploads = UploadGate(
            config.upload_window, grant_timeout=max(30.0, 10 * config.heartbeat_timeout)
        )
        # (peer, job) -> that worker's update of that job coming in parts
        self.streams: dict[tuple[str, str], UploadStream] = {}
        self.preparing: dict[str, float] = {}  # members building their jobs, since when
        self._hosted: HostedStore | None = None  # collective jobs' store, once one asks
        # A validator plugin looks at whole updates: with one, updates come whole.
        self._validators = plugins.implements("elastic_validate_update")

    # ------------------------------------------------------------ the term --

    def begin_term(self, specs: list[JobSpec]) -> None:
        """Start serving (having won the election): the member table, and every job
        (given, or found in the job store)."""
        self.membership = self.backend.member_table(self.config.heartbeat_timeout)
        self.serving = True
        try:
            self.board = self.backend.job_store(self.election)
            for spec in specs:
                self.board.publish(spec.id, spec.to_dict())  # a no-op if the job is stored already
                self.add_job(spec)
            for (
                job_id,
                parts,
            ) in self.board.jobs().items():  # every stored job, wherever it was submitted
                self._board_change(job_id, "spec", parts.get("spec", b""))
                self._board_change(job_id, "state", parts.get("state", b"running"))
        except BaseException:
            self.end_term()
            raise

    def end_term(self) -> None:
        """Stop serving: forget members and jobs (the next term reloads them from the
        job store and the checkpoints, as any other coordinator would)."""
        if not self.serving:
            return
        self.serving = False
        self.membership.close()
        self.board.close()
        self.engines.clear()
        self._published.clear()
        self.streams.clear()
        self.preparing.clear()

    def leading(self) -> bool | None:
        """True to serve, False once leadership is lost, None while unsure. After a
        stall longer than the lease (this process stopped, or starved) the lease may
        have run out unseen and another coordinator may lead: nothing queued is
        acted on until the backend confirms (or the lease thread gives up)."""
        if self.election.lost.is_set():
            return False
        if self.election.holds():
            return True
        return self.election.check()  # False (and ``lost`` set) if another coordinator leads

    # ---------------------------------------------------------------- jobs --

    def add_job(self, spec: JobSpec) -> Job:
        """Serve a job (its task, rule and chains built now: a bad spec fails here)."""
        if spec.id in self.engines:
            raise ConfigError(f"job id {spec.id!r} is given twice; give each job its own id")
        job = Job(spec, self.plugins, self.config.state_dir)
        kind: type[Engine] = RoundEngine
        if isinstance(job.aggregator, AsyncAggregator):
            kind = AsyncEngine
        elif isinstance(job.aggregator, CollectiveRule):
            kind = CollectiveEngine
        ctx = EngineContext(
            notify=self.plugins.notify,
            clock=self.clock,
            fence=self.election.check,
            holds=self.election.holds,
            ask=self.plugins.first_answer,
            local=self.peers.is_local if self.peers.enabled else None,
            on_status=lambda status: self.board.write_status(spec.id, status),
            collective_store=self._collective_store,
        )
        self.engines[spec.id] = kind(job, ctx)
        return job

    def _collective_store(self) -> str:
        """Where collective jobs' members meet: etcd itself, else a store hosted here
        on the host the coordinator binds (one for all jobs)."""
        if self.backend.name == "etcd":
            return "cluster"
        if self._hosted is None:
            host = urlsplit(self.config.bind.replace("*", "0.0.0.0")).hostname or "0.0.0.0"
            self._hosted = HostedStore(host)
        return self._hosted()

    def submit(self, spec: JobSpec) -> bool:
        """Store and serve a new job; False when the job store has one of that id."""
        if spec.id in self.engines:
            return False
        if not self.board.publish(spec.id, spec.to_dict()):
            return False
        self.add_job(spec)
        return True

    def desire(self, engine: Engine, state: str) -> None:
        """The operator's wish for a job, kept in the job store for the next leader."""
        self.board.set_state(engine.job.spec.id, state)
        engine.set_desired(state)

    def reload(self, config: CoordinatorConfig, specs: list[JobSpec]) -> list[str]:
        """Settings that apply at once, and the new jobs among ``specs`` (their ids)."""
        self.membership.heartbeat_timeout = config.heartbeat_timeout
        self.uploads.window = config.upload_window
        added = []
        for spec in specs:
            if spec.id in self.engines:
                continue
            try:
                self.board.publish(spec.id, spec.to_dict())
                self.add_job(spec)
                added.append(spec.id)
            except Exception as exc:  # the jobs already running go on
                log.error("cannot serve job %s after reload: %s", spec.id, exc)
        return added

    def _board_change(self, job_id: str, part: str, value: bytes) -> None:
        """A job's spec or desired state as found in the job store."""
        if part == "spec" and value and job_id not in self.engines:
            try:
                spec = JobSpec.from_dict(json.loads(value))
                if spec.id != job_id:
                    raise ValueError(f"spec id {spec.id!r} under key of job {job_id!r}")
                self.add_job(spec)
                log.info("serving stored job job=%s task=%s rule=%s", spec.id, spec.task, spec.rule)
            except Exception as exc:  # a bad stored spec must not stop the jobs that are fine
                log.error(
                    "cannot serve stored job %s: %s: %s; fix or delete its spec",
                    job_id,
                    type(exc).__name__,
                    exc,
                )
        elif part == "state" and job_id in self.engines:
            self.engines[job_id].set_desired(value.decode("utf-8", "replace"))

    def members(self) -> list[Member]:
        """The workers taking part now."""
        return self.membership.members() if self.serving else []

    @property
    def done(self) -> bool:
        return bool(self.engines) and all(e.job.done for e in self.engines.values())

    # ---------------------------------------------------------------- time --

    def tick(self) -> None:
        """Membership and job-store changes, upload deadlines, and each engine's turn
        (rounds started, deadlines enforced)."""
        now = self.clock()
        for job_id, part, value in self.board.changes(now):
            self._board_change(job_id, part, value)
        for event in self.membership.poll(now):
            m = event.member
            for engine in self.engines.values():
                engine.job.note(event.kind, worker=m.id, device=m.device, reason=event.reason)
            if event.kind == "joined":
                log.info(
                    "worker joined worker=%s device=%s host=%s slot=%d",
                    m.id,
                    m.device,
                    m.host,
                    m.slot,
                )
                self.plugins.notify(
                    "elastic_worker_joined",
                    worker_id=m.id,
                    device=m.device,
                    host=m.host,
                    slot=m.slot,
                )
            else:
                log.info("worker left worker=%s reason=%s", m.id, event.reason)
                self.peers.drop(m.id)
                self.plugins.notify("elastic_worker_left", worker_id=m.id, reason=event.reason)
                self._end_stream(m.id)
                self.preparing.pop(m.id, None)
                for engine in self.engines.values():
                    engine.on_member_left(m.id)
                self._grant(self.uploads.done(m.id, now))
        self._grant(self.uploads.expire(now))
        members = [m for m in self.membership.members() if not self._still_preparing(m.id, now)]
        for engine in self.engines.values():
            self.outbox.extend(engine.tick(members))
            self._publish_generation(engine)

    def _jobs_to_prepare(self, slot: int) -> list[dict[str, Any]]:
        """What a joining worker builds before it takes work (WELCOME's ``jobs``): each
        running job's task and the data shard of its slot."""
        jobs = []
        for job_id, engine in self.engines.items():
            spec = engine.job.spec
            if not engine.job.done:
                jobs.append(
                    {
                        "job": job_id,
                        "task": spec.task,
                        "task_params": spec.task_params,
                        "seed": spec.seed,
                        "shard": [slot % spec.shard_count, spec.shard_count],
                    }
                )
        return jobs

    def _still_preparing(self, peer: str, now: float) -> bool:
        """A member building its jobs is not given work yet (its first round would
        wait for the build), for at most ``PREPARE_LIMIT`` seconds."""
        since = self.preparing.get(peer)
        if since is None:
            return False
        if now - since < PREPARE_LIMIT:
            return True
        log.warning(
            "worker still preparing worker=%s seconds=%.0f: giving it work anyway",
            peer,
            now - since,
        )
        self.preparing.pop(peer)
        return False

    def _prepared(self, peer: str, now: float) -> None:
        since = self.preparing.pop(peer, None)
        if since is not None:
            log.info("worker prepared worker=%s seconds=%.2f", peer, now - since)

    def _publish_generation(self, engine: Engine) -> None:
        """Keep ``rendezvous/<job>/generation`` in the cluster current."""
        job_id = engine.job.spec.id
        if engine.generation != self._published.get(job_id):
            self.election.publish_later(f"rendezvous/{job_id}/generation", str(engine.generation))
            self._published[job_id] = engine.generation

    # ------------------------------------------------------------ messages --

    def take(self) -> list[Outgoing]:
        """The messages to send now (the outbox, emptied)."""
        out, self.outbox = self.outbox, []
        return out

    def unreachable(self, peer: str) -> None:
        """A message to ``peer`` could not be sent: it is gone."""
        self.membership.leave(peer, "unreachable")

    def receive(self, peer: str, msg: Message) -> None:
        """A message from ``peer`` (decoded and checked; its sender is ``peer``)."""
        now = self.clock()
        if msg.type is MsgType.HELLO:
            member = self.membership.join(
                Member(
                    id=peer,
                    host=msg.meta["host"],
                    device=msg.meta["device"],
                    software=msg.meta["software"],
                    pid=msg.meta["pid"],
                ),
                now,
            )
            local = self.peers.hello(peer, msg.meta.get("shm"))
            jobs = self._jobs_to_prepare(member.slot)
            if msg.meta.get("prepares") and jobs:
                self.preparing.setdefault(peer, now)  # (a HELLO sent again keeps the first)
            self._send(
                peer,
                Message(
                    MsgType.WELCOME,
                    meta={
                        "heartbeat_interval": self.config.heartbeat_interval,
                        "heartbeat_timeout": self.config.heartbeat_timeout,
                        "slot": member.slot,
                        "software": __version__,
                        "shm": local,
                        "jobs": jobs,
                    },
                ),
            )
        elif msg.type is MsgType.HEARTBEAT:
            if not msg.meta.get("preparing", False):
                self._prepared(peer, now)
            if self.membership.heartbeat(peer, now, busy=msg.meta["busy"]):
                self._send(peer, Message(MsgType.HEARTBEAT_ACK))
            else:
                self.reject(
                    peer, "", "unknown_member", "this coordinator does not know you; send HELLO"
                )
        elif msg.type is MsgType.BYE:
            self.membership.leave(peer, "bye")
            self._send(peer, Message(MsgType.ACK, key=msg.key))  # the worker may now disconnect
        elif msg.type is MsgType.UPDATE:
            more = self._on_update(peer, msg, now)
            # Let go of this update's frames before the next upload is granted, or its
            # bytes arrive while these are still held: two updates in memory at once.
            msg.tensors.clear()
            self._grant(
                self.uploads.done(peer, now, msg.key)
            )  # its bytes are folded or refused: the next may come
            if more is not None:  # the next part, in turn with the other offers
                self._grant(self.uploads.offer(peer, msg.job, msg.key, more, now))
        elif msg.type is MsgType.OFFER:
            self._on_offer(peer, msg, now)
        elif msg.type is MsgType.EXCHANGE:
            engine = self._member_engine(peer, msg, now)
            refusal = engine.on_exchange(peer, msg) if engine is not None else None
            if refusal is not None:
                self.rejected[refusal.meta["reason"]] += 1
                self._send(peer, refusal)
        elif msg.type is MsgType.NACK:
            engine = self.engines.get(msg.job)
            if engine is not None:
                engine.on_worker_failed(
                    peer, msg.round, f"{msg.meta['reason']}: {msg.meta['detail']}", msg.key
                )
        else:
            self.reject(
                peer, msg.job, "unexpected_type", f"a coordinator does not accept {msg.type}"
            )

    def _member_engine(self, peer: str, msg: Message, now: float) -> Engine | None:
        """The engine of ``msg``'s job, if ``peer`` is a member and the job is ours;
        else None, the NACK sent."""
        if not self.membership.heartbeat(peer, now, busy=False):
            self.reject(
                peer,
                msg.job,
                "unknown_member",
                "this coordinator does not know you; send HELLO",
                msg,
            )
            return None
        engine = self.engines.get(msg.job)
        if engine is None:
            self.reject(
                peer,
                msg.job,
                "unknown_job",
                f"no job {msg.job!r} here (jobs: {', '.join(self.engines) or 'none'})",
                msg,
            )
        return engine

    def _on_update(self, peer: str, msg: Message, now: float) -> int | None:
        """Fold an update or a part of one; the bytes of the next part, if one is to come."""
        engine = self._member_engine(peer, msg, now)
        if engine is None:
            return None
        stream = self.streams.get((peer, msg.job))
        if "part" not in msg.meta:
            reply: Message | None = engine.on_update(peer, msg)
        elif stream is None or not stream.expects(msg.key, msg.meta["part"]):
            expected = f"part {stream.index} of {stream.key}" if stream is not None else "no part"
            self.reject(
                peer,
                msg.job,
                "bad_part",
                f"got part {msg.meta['part']!r} of {msg.key}, expected {expected}",
                msg,
            )
            self._end_stream(peer, msg.job)
            return None
        else:
            reply = engine.on_update_part(peer, msg, stream.current())
        if reply is None:  # a part folded; more are to come
            assert stream is not None
            return stream.advance(msg.payload_bytes)
        if stream is not None and stream.key == msg.key:
            del self.streams[(peer, msg.job)]
        if reply.type is MsgType.NACK:
            self.rejected[reply.meta["reason"]] += 1
        self._send(peer, reply)
        return None

    def _on_offer(self, peer: str, msg: Message, now: float) -> None:
        """A worker has a big update ready: grant it, or its first part, when it fits
        the upload window."""
        engine = self._member_engine(peer, msg, now)
        if engine is None:
            return
        if not 0 < msg.meta["bytes"] <= self.config.max_message_bytes:
            self.reject(
                peer,
                msg.job,
                "too_big",
                f"an update of {msg.meta['bytes']} bytes; this coordinator takes 1 to "
                f"{self.config.max_message_bytes} (--max-message-bytes)",
                msg,
            )
            return
        parts = (
            engine.upload_parts(self.config.upload_part, msg.meta["bytes"])
            if msg.meta.get("parts") is True and not self._validators
            else None
        )
        # A worker offers its newest result of a job: an older one of that job is
        # over (its updates of other jobs go on).
        self._end_stream(peer, msg.job)
        if parts is not None and len(parts) > 1:
            stream = UploadStream(msg.job, msg.key, parts, engine.itemsizes)
            self.streams[(peer, msg.job)] = stream
            self._grant(self.uploads.offer(peer, msg.job, msg.key, stream.bytes(0) or 1, now))
        else:
            self._grant(self.uploads.offer(peer, msg.job, msg.key, msg.meta["bytes"], now))

    def _end_stream(self, peer: str, job: str | None = None) -> None:
        """``peer``'s update in parts of ``job`` (None: of every job) goes no
        further: the engine is told when some of it was folded (the round then waits
        for it no more)."""
        ended = [slot for slot in self.streams if slot[0] == peer and job in (None, slot[1])]
        for slot in ended:
            stream = self.streams.pop(slot)
            engine = self.engines.get(stream.job)
            if stream.index > 0 and engine is not None:
                engine.abandon_parts(peer, stream.key)

    def _grant(self, offers: list[Offer]) -> None:
        for offer in offers:
            log.debug(
                "upload granted worker=%s key=%s bytes=%d in_flight=%d",
                offer.peer,
                offer.key,
                offer.nbytes,
                self.uploads.in_flight,
            )
            stream = self.streams.get(offer.slot)
            meta: dict[str, Any] = {}
            if stream is not None and stream.key == offer.key:
                meta = {
                    "part": [stream.index, len(stream.parts)],
                    "segments": [list(seg) for seg in stream.parts[stream.index]],
                }
            self._send(offer.peer, Message(MsgType.GRANT, key=offer.key, meta=meta))

    def reject(
        self, peer: str, job: str, reason: str, detail: str, msg: Message | None = None
    ) -> None:
        """Refuse a message with a NACK naming the reason; counted and told to observers."""
        self.rejected[reason] += 1
        log.warning("message rejected peer=%r reason=%s detail=%s", peer, reason, detail)
        self.plugins.notify(
            "elastic_update_rejected", job_id=job, worker_id=peer, reason=reason, detail=detail
        )
        nack = Message(MsgType.NACK, job=job, meta={"reason": reason, "detail": detail})
        if msg is not None:
            nack.round, nack.version, nack.key = msg.round, msg.version, msg.key
        self._send(peer, nack)

    def _send(self, peer: str, msg: Message) -> None:
        self.outbox.append(Outgoing(peer, msg))

    # ------------------------------------------------------------- reports --

    def snapshot(self) -> dict[str, Any]:
        """Figures for the metrics: jobs, members by device kind, refusals, serving."""
        jobs = {
            job_id: {
                "round": e.job.round,
                "version": e.job.version,
                "rounds": e.job.spec.rounds,
                "state": str(e.job.state),
                "totals": dict(e.job.totals),
                "figures": e.job.aggregator.figures(),
            }
            for job_id, e in self.engines.items()
        }
        members = (
            Counter(
                m.device.split()[0].split(":")[0] if m.device else "unknown"
                for m in self.membership.members()
            )
            if self.serving
            else Counter()
        )
        return {
            "jobs": jobs,
            "members": dict(members),
            "rejected": dict(self.rejected),
            "serving": self.serving and not self.election.lost.is_set(),
        }

    def status_line(self) -> str:
        jobs = "; ".join(
            f"{job_id} {e.job.state} round {e.job.round}/{e.job.spec.rounds}"
            for job_id, e in self.engines.items()
        )
        role = "leading, " if self.backend.shared else ""
        workers = len(self.membership.members()) if self.serving else 0
        return f"{role}{workers} workers; {jobs or 'no jobs'}"

    def close(self) -> None:
        """Release what the engines hold outside the process, and end the term."""
        for engine in self.engines.values():
            engine.close()
        self.end_term()
