"""The coordinator daemon: one event loop owns every job, the member table and the socket.

Each pass of the loop: receive what has arrived (each message decoded, validated
and answered), hand membership changes to the round engines, let each engine start
rounds or enforce deadlines, and send what they produced. A bad message is
answered with a NACK (or dropped when it cannot be answered) and counted; nothing a
peer sends can stop the loop.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq

from elastic import __version__
from elastic.allocator import tune_allocator
from elastic.config import CoordinatorConfig, apply_reload, default_control
from elastic.coordinator.asynchronous import AsyncEngine
from elastic.coordinator.control import ControlAPI
from elastic.coordinator.engine import Engine, Outgoing
from elastic.coordinator.job import Job
from elastic.coordinator.rounds import RoundEngine
from elastic.coordinator.uploads import Offer, UploadGate, UploadStream
from elastic.errors import ConfigError, ElasticError, MembershipUnavailable, ProtocolError
from elastic.jobspec import JobSpec
from elastic.logs import setup_logging
from elastic.membership.base import Member, MemberTable
from elastic.membership.cluster import Election, JobStore, LeaderRecord, open_backend
from elastic.metrics import Metrics
from elastic.plugins import Plugins
from elastic.rules import AsyncAggregator
from elastic.sdnotify import Notifier
from elastic.security import CONTROL, DATA, CurveServer
from elastic.wire.buffers import Tracker
from elastic.wire.frames import decode
from elastic.wire.header import Message, MsgType
from elastic.wire.shm import LocalPeers
from elastic.wire.transport import recv_frames, router_socket, send_message

__all__ = ["Coordinator"]

log = logging.getLogger("elastic.coordinator")
Reloader = Callable[[], tuple[CoordinatorConfig, list[JobSpec]]]
MAX_BATCH = 256  # messages handled per pass before engines get a turn
MAX_CONTROL_BYTES = 64 << 20  # a control request carries a job spec, not tensors


def advertised(endpoint: str) -> str:
    """The endpoint workers on other hosts can reach: a wildcard host becomes our name."""
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if host in ("0.0.0.0", "*", "[::]", "::"):
        host = socket.getfqdn()
    return f"{scheme}://{host}:{port}"


class Coordinator:
    """Serves jobs to workers. ``run()`` blocks until ``stop()`` (or a signal)."""

    def __init__(
        self, config: CoordinatorConfig, plugins: Plugins, specs: list[JobSpec], reloader: Reloader | None = None
    ) -> None:
        tune_allocator()
        self.config = config
        self.plugins = plugins
        self.reloader = reloader  # SIGHUP: the configuration and job specs read again
        self.notifier = Notifier()
        self._reload_asked = threading.Event()
        self._status_at = 0.0
        self.metrics: Metrics | None = None
        if config.metrics_port:
            self.metrics = Metrics()
            plugins.register(self.metrics, name="elastic-metrics", distribution="elastic (built in)")
            port = self.metrics.serve(config.metrics_host, config.metrics_port)
            log.info("metrics served address=http://%s:%d/metrics", config.metrics_host, port)
        self._stop = threading.Event()
        self._stop_reason = "stopped"
        self.exit_code = 0
        self.ctx: zmq.Context = zmq.Context.instance()
        self.curve: CurveServer | None = None
        if config.curve_key:
            self.curve = CurveServer(self.ctx, config.curve_key, {DATA: config.allow_workers, CONTROL: config.allow_admins})
        else:
            log.warning("plaintext (--insecure): anyone who reaches %s can join, send updates and read models; use CURVE keys beyond a network you trust", config.bind)
        curve = self.curve
        self.sock, self.endpoint = router_socket(self.ctx, config.bind, secure=(lambda s: curve.apply(s, DATA)) if curve else None)
        self.control_sock, self.control_endpoint = router_socket(self.ctx, config.control or default_control(config.bind), secure=(lambda s: curve.apply(s, CONTROL)) if curve else None)
        self.control = ControlAPI(self)
        self.engines: dict[str, Engine] = {}
        self.membership: MemberTable
        self.board: JobStore
        self._serving = False  # a term is on: members and jobs are loaded
        self.rejected: Counter[str] = Counter()
        self._published: dict[str, int] = {}  # rendezvous generation last queued for the cluster, by job
        self.bytes_in = 0
        self.bytes_out = 0
        self.local = LocalPeers(config.shared_memory)  # workers on this host: tensors through /dev/shm
        self.uploads = UploadGate(config.upload_window, grant_timeout=max(30.0, 10 * config.heartbeat_timeout))
        self.streams: dict[str, UploadStream] = {}  # peer -> its update coming in parts
        # A validator plugin looks at whole updates: with one, updates come whole.
        self._validators = self.plugins.implements("elastic_validate_update")
        self.backend = open_backend(config.membership, plugins.backends)
        # Jobs load their newest checkpoint only once this coordinator leads, so a
        # standby that takes over resumes where the old leader stopped.
        self.election: Election = self.backend.election(config.id, config.lease_ttl)
        if self.backend.shared:
            self.notifier.ready("standing by for leadership")  # a standby is a service that started fine
        self.election.campaign(self._leader_record(), tick=self.notifier.watchdog)
        try:
            self._begin_term(specs)
        except BaseException:  # e.g. a checkpoint of another job: hand leadership on at once
            self.sock.close(linger=0)
            self.control_sock.close(linger=0)
            self.election.resign()
            raise

    def _leader_record(self) -> LeaderRecord:
        return LeaderRecord(self.config.id, advertised(self.endpoint), advertised(self.control_endpoint), time.time())

    def _begin_term(self, specs: list[JobSpec]) -> None:
        """Start serving: the member table, and every job (given, or found stored)."""
        self.membership = self.backend.member_table(self.config.heartbeat_timeout)
        self._serving = True
        try:
            self.board = self.backend.job_store(self.election)
            for spec in specs:
                self.board.publish(spec.id, spec.to_dict())  # a no-op if the job is stored already
                self.add_job(spec)
            for job_id, parts in self.board.jobs().items():  # every stored job, wherever it was submitted
                self._board_change(job_id, "spec", parts.get("spec", b""))
                self._board_change(job_id, "state", parts.get("state", b"running"))
        except BaseException:
            self._end_term()
            raise

    def _end_term(self) -> None:
        """Stop serving: forget members and jobs (the next term reloads them from
        the job store and the checkpoints, as any other coordinator would)."""
        if not self._serving:
            return
        self._serving = False
        self.membership.close()
        self.board.close()
        self.engines.clear()
        self._published.clear()

    def _stand_by(self) -> bool:
        """After losing leadership: campaign again, then serve anew. False if stopped."""
        self._end_term()
        self.election.step_down()
        log.warning("lost leadership: standing by; serving again if elected")
        self.notifier.status("standing by for leadership")
        while self.election.campaign(self._leader_record(), stop=self._stop, tick=self.notifier.watchdog):
            try:
                self._begin_term([])
                return True
            except MembershipUnavailable as exc:  # the backend failed again: stand by again
                log.error("cannot serve after winning the election: %s", exc)
                self.election.step_down()
        return False

    def add_job(self, spec: JobSpec) -> Job:
        if spec.id in self.engines:
            raise ConfigError(f"job id {spec.id!r} is given twice; give each job its own id")
        job = Job(spec, self.plugins, self.config.state_dir)
        kind = AsyncEngine if isinstance(job.aggregator, AsyncAggregator) else RoundEngine
        local = (lambda peer: self.local.writer(peer) is not None) if self.local.enabled else None
        engine = self.engines[spec.id] = kind(job, self.plugins.notify, fence=self.election.check, holds=self.election.holds, ask=self.plugins.first_answer, local=local)
        engine.on_status = functools.partial(self.board.write_status, spec.id)
        return job

    # ---------------------------------------------------------------- loop --

    def run(self, install_signals: bool = True) -> None:
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, _frame: self.stop(f"signal {signal.Signals(signum).name}"))
            signal.signal(signal.SIGHUP, lambda *_: self._reload_asked.set())
        log.info("coordinator serving address=%s control=%s jobs=%s membership=%s", self.endpoint, self.control_endpoint, ",".join(self.engines) or "-", self.backend)
        self.plugins.notify("elastic_coordinator_started", address=self.endpoint, jobs=list(self.engines))
        self.notifier.ready(self._status_line())
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.control_sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(timeout=50))
                leading = self._still_leading()
                if leading is None:  # the lease may have run out: act on nothing yet
                    self.notifier.watchdog()
                    self._stop.wait(0.1)
                    continue
                if not leading:
                    if not self._stand_by():
                        break
                    continue
                if self.sock in ready:
                    self._drain(self.sock, self._handle)
                if self.control_sock in ready:
                    self._drain(self.control_sock, self._answer_control)
                self._housekeeping()
                self._supervision()
                if self.config.exit_when_done and self.engines and all(e.job.done for e in self.engines.values()):
                    self.stop("all jobs done")
        finally:
            self.plugins.notify("elastic_coordinator_stopping", reason=self._stop_reason)
            rejected = ",".join(f"{k}:{v}" for k, v in sorted(self.rejected.items())) or "none"
            shm_sent, shm_busy = self.local.counts()
            log.info("coordinator stopping reason=%s bytes_in=%d bytes_out=%d shm_sent=%d shm_busy=%d rejected=%s", self._stop_reason, self.bytes_in, self.bytes_out, shm_sent, shm_busy, rejected)
            self.sock.close(linger=0)
            self.control_sock.close(linger=0)
            self.local.close()
            for engine in self.engines.values():
                engine.close()
            if self.curve is not None:
                self.curve.stop()
            self._end_term()
            self.election.resign()
            self.notifier.close()
            if self.metrics is not None:
                self.metrics.close()

    def _still_leading(self) -> bool | None:
        """True to serve, False once leadership is lost, None while unsure. After a
        stall longer than the lease (this process stopped, or starved) the lease may
        have run out unseen and another coordinator may lead: nothing queued is
        acted on until the backend confirms (or the lease thread gives up)."""
        if self.election.lost.is_set():
            return False
        if self.election.holds():
            return True
        return self.election.check()  # False (and ``lost`` set) if another coordinator leads

    def stop(self, reason: str = "stopped") -> None:
        self._stop_reason = reason
        self._stop.set()
        self.notifier.stopping()

    # --------------------------------------------------------- supervision --

    def _supervision(self) -> None:
        """What systemd (or any supervisor) hears from the main loop: the watchdog,
        a status line once a second, and SIGHUP handled here, outside the handler."""
        self.notifier.watchdog()
        now = time.monotonic()
        if now - self._status_at >= 1.0:
            self._status_at = now
            self.notifier.status(self._status_line())
            if self.metrics is not None:
                self.metrics.update(self._metrics_snapshot())
        if self._reload_asked.is_set():
            self._reload_asked.clear()
            self._reload()

    def _metrics_snapshot(self) -> dict[str, Any]:
        jobs = {
            job_id: {"round": e.job.round, "version": e.job.version, "rounds": e.job.spec.rounds, "state": str(e.job.state), "totals": dict(e.job.totals)}
            for job_id, e in self.engines.items()
        }
        members = Counter(m.device.split()[0].split(":")[0] if m.device else "unknown" for m in self.membership.members())
        serving = self._serving and not self.election.lost.is_set()
        rejected = dict(self.rejected) | (self.curve.refused() if self.curve is not None else {})
        return {"jobs": jobs, "members": dict(members), "rejected": rejected, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "serving": serving}

    def _status_line(self) -> str:
        jobs = "; ".join(f"{job_id} {e.job.state} round {e.job.round}/{e.job.spec.rounds}" for job_id, e in self.engines.items())
        role = "leading, " if self.backend.shared else ""
        return f"{role}{len(self.membership.members())} workers; {jobs or 'no jobs'}"

    def _reload(self) -> None:
        if self.reloader is None:
            log.warning("SIGHUP ignored: this coordinator was not started from a configuration it can read again")
            return
        self.notifier.reloading()
        try:
            config, specs = self.reloader()
        except ElasticError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.notifier.ready()
            return
        applied, restart = apply_reload(self.config, config)
        setup_logging(self.config.log_format, self.config.log_level)
        if self.curve is not None:
            try:  # keys added to or removed from the allow-lists take effect now
                self.curve.reload()
            except ElasticError as exc:
                log.error("allow-lists not reloaded: %s", exc)
        self.membership.heartbeat_timeout = self.config.heartbeat_timeout
        self.uploads.window = self.config.upload_window
        added = []
        for spec in specs:
            if spec.id in self.engines:
                continue
            try:
                self.board.publish(spec.id, spec.to_dict())
                self.add_job(spec)
                added.append(spec.id)
            except ElasticError as exc:  # the jobs already running go on
                log.error("cannot serve job %s after reload: %s", spec.id, exc)
        log.info("configuration reloaded applied=%s new_jobs=%s needs_restart=%s", ",".join(applied) or "-", ",".join(added) or "-", ",".join(restart) or "-")
        self.notifier.ready(self._status_line())

    def _drain(self, sock: zmq.Socket, handle: Callable[[bytes, list[zmq.Frame]], None]) -> None:
        """Handle what waits on ``sock`` (a bounded batch: the engines get their turn)."""
        for _ in range(MAX_BATCH):
            try:
                routing, frames = recv_frames(sock, routed=True)
            except zmq.Again:
                return
            assert routing is not None
            try:
                handle(routing, frames)
            except Exception:  # a bug on one message must not take the daemon down
                log.exception("error handling a message from %r", routing)

    def _answer_control(self, routing: bytes, frames: list[zmq.Frame]) -> None:
        try:
            request = decode(frames, max_message_bytes=MAX_CONTROL_BYTES)
        except ProtocolError as exc:
            self.rejected[exc.reason] += 1
            reply = Message(MsgType.REPLY, meta={"ok": False, "data": {}, "code": "bad_request", "error": f"{exc.reason}: {exc.detail}"})
        else:
            reply = self.control.handle(request)
        try:
            send_message(self.control_sock, reply, routing)
        except zmq.ZMQError as exc:
            log.warning("cannot answer a control request error=%s", exc.strerror)

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
                log.error("cannot serve stored job %s: %s: %s; fix or delete its spec", job_id, type(exc).__name__, exc)
        elif part == "state" and job_id in self.engines:
            self.engines[job_id].set_desired(value.decode("utf-8", "replace"))

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for job_id, part, value in self.board.changes(now):
            self._board_change(job_id, part, value)
        for event in self.membership.poll(now):
            m = event.member
            for engine in self.engines.values():
                engine.job.note(event.kind, worker=m.id, device=m.device, reason=event.reason)
            if event.kind == "joined":
                log.info("worker joined worker=%s device=%s host=%s slot=%d", m.id, m.device, m.host, m.slot)
                self.plugins.notify("elastic_worker_joined", worker_id=m.id, device=m.device, host=m.host, slot=m.slot)
            else:
                log.info("worker left worker=%s reason=%s", m.id, event.reason)
                self.local.drop(m.id)
                self.plugins.notify("elastic_worker_left", worker_id=m.id, reason=event.reason)
                for engine in self.engines.values():
                    engine.on_member_left(m.id)
                self.streams.pop(m.id, None)
                self._grant(self.uploads.done(m.id, now))
        self._grant(self.uploads.expire(now))
        members = self.membership.members()
        for engine in self.engines.values():
            self._send_all(engine.tick(members))
            self._publish_generation(engine)

    def _publish_generation(self, engine: Engine) -> None:
        """Keep ``rendezvous/<job>/generation`` in the cluster current."""
        job_id = engine.job.spec.id
        if engine.generation != self._published.get(job_id):
            self.election.publish_later(f"rendezvous/{job_id}/generation", str(engine.generation))
            self._published[job_id] = engine.generation

    # ------------------------------------------------------------ messages --

    def _handle(self, routing: bytes, frames: list[zmq.Frame]) -> None:
        self.bytes_in += sum(len(f) for f in frames)
        peer = routing.decode("utf-8", "replace")
        try:
            msg = decode(frames, max_message_bytes=self.config.max_message_bytes, shm=self.local.reader(peer))
            if msg.sender != peer:
                raise ProtocolError("sender_mismatch", f"header sender {msg.sender!r} is not the connection's id {peer!r}")
        except ProtocolError as exc:
            self._reject(routing, peer, "", exc.reason, exc.detail)
            return
        now = time.monotonic()
        if msg.type is MsgType.HELLO:
            member = self.membership.join(
                Member(id=peer, host=msg.meta["host"], device=msg.meta["device"], software=msg.meta["software"], pid=msg.meta["pid"]),
                now,
            )
            local = self.local.hello(peer, msg.meta.get("shm"))
            self._send(routing, Message(MsgType.WELCOME, meta={"heartbeat_interval": self.config.heartbeat_interval, "heartbeat_timeout": self.config.heartbeat_timeout, "slot": member.slot, "software": __version__, "shm": local}))
        elif msg.type is MsgType.HEARTBEAT:
            if self.membership.heartbeat(peer, now, busy=msg.meta["busy"]):
                self._send(routing, Message(MsgType.HEARTBEAT_ACK))
            else:
                self._reject(routing, peer, "", "unknown_member", "this coordinator does not know you; send HELLO")
        elif msg.type is MsgType.BYE:
            self.membership.leave(peer, "bye")
            self._send(routing, Message(MsgType.ACK, key=msg.key))  # the worker may now disconnect
        elif msg.type is MsgType.UPDATE:
            more = self._on_update(routing, peer, msg, now)
            # Let go of this update's frames before the next upload is granted, or its
            # bytes arrive while these are still held: two updates in memory at once.
            frames.clear()
            msg.tensors.clear()
            self._grant(self.uploads.done(peer, now, msg.key))  # its bytes are folded or refused: the next may come
            if more is not None:  # the next part, in turn with the other offers
                self._grant(self.uploads.offer(peer, msg.key, more, now))
        elif msg.type is MsgType.OFFER:
            self._on_offer(routing, peer, msg, now)
        elif msg.type is MsgType.NACK:
            engine = self.engines.get(msg.job)
            if engine is not None:
                engine.on_worker_failed(peer, msg.round, f"{msg.meta['reason']}: {msg.meta['detail']}")
        else:
            self._reject(routing, peer, msg.job, "unexpected_type", f"a coordinator does not accept {msg.type}")

    def _on_update(self, routing: bytes, peer: str, msg: Message, now: float) -> int | None:
        """Fold an update or a part of one; the bytes of the next part, if one is to come."""
        if not self.membership.heartbeat(peer, now, busy=False):
            self._reject(routing, peer, msg.job, "unknown_member", "this coordinator does not know you; send HELLO", msg)
            return None
        engine = self.engines.get(msg.job)
        if engine is None:
            self._reject(routing, peer, msg.job, "unknown_job", f"no job {msg.job!r} here (jobs: {', '.join(self.engines) or 'none'})", msg)
            return None
        stream = self.streams.get(peer)
        if "part" not in msg.meta:
            reply: Message | None = engine.on_update(peer, msg)
        elif stream is None or stream.key != msg.key or msg.meta["part"] != [stream.index, len(stream.parts)]:
            expected = f"part {stream.index} of {stream.key}" if stream is not None else "no part"
            self._reject(routing, peer, msg.job, "bad_part", f"got part {msg.meta['part']!r} of {msg.key}, expected {expected}", msg)
            if self.streams.pop(peer, None) is not None:
                engine.abandon_parts(peer)
            return None
        else:
            reply = engine.on_update_part(peer, msg, stream.parts[stream.index])
        if reply is None:  # a part folded; more are to come
            assert stream is not None
            stream.index += 1
            return stream.bytes(stream.index)
        if stream is not None and stream.key == msg.key:  # (a whole update of another job leaves it be)
            del self.streams[peer]
        if reply.type is MsgType.NACK:
            self.rejected[reply.meta["reason"]] += 1
        self._send(routing, reply)
        return None

    def _on_offer(self, routing: bytes, peer: str, msg: Message, now: float) -> None:
        """A worker has a big update ready: grant it, or its first part, when it fits
        the upload window."""
        engine = self.engines.get(msg.job)
        if not self.membership.heartbeat(peer, now, busy=False):
            self._reject(routing, peer, msg.job, "unknown_member", "this coordinator does not know you; send HELLO", msg)
        elif engine is None:
            self._reject(routing, peer, msg.job, "unknown_job", f"no job {msg.job!r} here (jobs: {', '.join(self.engines) or 'none'})", msg)
        elif not 0 < msg.meta["bytes"] <= self.config.max_message_bytes:
            self._reject(routing, peer, msg.job, "too_big", f"an update of {msg.meta['bytes']} bytes; this coordinator takes 1 to {self.config.max_message_bytes} (--max-message-bytes)", msg)
        else:
            parts = engine.upload_parts(self.config.upload_part) if msg.meta.get("parts") is True and not self._validators else None
            self.streams.pop(peer, None)
            if parts is not None and len(parts) > 1:
                stream = self.streams[peer] = UploadStream(msg.key, parts, engine.itemsizes)
                self._grant(self.uploads.offer(peer, msg.key, stream.bytes(0) or 1, now))
            else:
                self._grant(self.uploads.offer(peer, msg.key, msg.meta["bytes"], now))

    def _grant(self, offers: list[Offer]) -> None:
        for offer in offers:
            log.debug("upload granted worker=%s key=%s bytes=%d in_flight=%d", offer.peer, offer.key, offer.nbytes, self.uploads.in_flight)
            stream = self.streams.get(offer.peer)
            meta: dict[str, Any] = {}
            if stream is not None and stream.key == offer.key:
                meta = {"part": [stream.index, len(stream.parts)], "segments": [list(seg) for seg in stream.parts[stream.index]]}
            self._send(offer.peer.encode(), Message(MsgType.GRANT, key=offer.key, meta=meta))

    def _reject(self, routing: bytes, peer: str, job: str, reason: str, detail: str, msg: Message | None = None) -> None:
        self.rejected[reason] += 1
        log.warning("message rejected peer=%r reason=%s detail=%s", peer, reason, detail)
        self.plugins.notify("elastic_update_rejected", job_id=job, worker_id=peer, reason=reason, detail=detail)
        nack = Message(MsgType.NACK, job=job, meta={"reason": reason, "detail": detail})
        if msg is not None:
            nack.round, nack.version, nack.key = msg.round, msg.version, msg.key
        self._send(routing, nack)

    def _send_all(self, outgoing: list[Outgoing]) -> None:
        pooled = {}
        for out in outgoing:
            ok, tracker = self._send_tracked(out.worker.encode(), out.message, track=out.buffers is not None)
            if not ok:
                self.membership.leave(out.worker, "unreachable")
            if out.buffers is not None:
                out.buffers.attach(tracker)
                pooled[id(out.buffers)] = out.buffers
        for buffers in pooled.values():
            buffers.release()

    def _send(self, routing: bytes, msg: Message) -> bool:
        return self._send_tracked(routing, msg)[0]

    def _send_tracked(self, routing: bytes, msg: Message, track: bool = False) -> tuple[bool, Tracker | None]:
        """Whether it was sent, and (with ``track``) the tracker of its frames."""
        try:
            tracker = send_message(self.sock, msg, routing, track=track, lane=self.local.writer(routing.decode("utf-8", "replace")))
        except zmq.ZMQError as exc:
            log.warning("cannot send to peer=%r type=%s error=%s", routing, msg.type, exc.strerror)
            return False, None
        self.bytes_out += msg.payload_bytes
        return True, tracker
