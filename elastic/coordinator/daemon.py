"""The coordinator daemon: the shell around ``CoordinatorCore`` that owns the sockets.

Each pass of the loop: confirm the leadership term (standing by when it is lost),
receive what has arrived (each message decoded and handed to the core; one that
does not decode is answered with a NACK and counted), let the core's time pass
(membership, rounds, deadlines), and send what the core put in its outbox. Around
it: CURVE, the control socket, metrics, sd_notify and SIGHUP. A bad message, or a
bug on one message, never stops the loop.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable

import zmq

from elastic.allocator import tune_allocator
from elastic.config import CoordinatorConfig, apply_reload, default_control
from elastic.coordinator.control import ControlAPI
from elastic.coordinator.core import CoordinatorCore
from elastic.coordinator.engine import Outgoing
from elastic.errors import ElasticError, MembershipUnavailable, ProtocolError
from elastic.jobspec import JobSpec
from elastic.logs import setup_logging
from elastic.membership.cluster import LeaderRecord, open_backend
from elastic.metrics import Metrics
from elastic.plugins import Plugins
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
        self,
        config: CoordinatorConfig,
        plugins: Plugins,
        specs: list[JobSpec],
        reloader: Reloader | None = None,
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
            plugins.register(
                self.metrics, name="elastic-metrics", distribution="elastic (built in)"
            )
            port = self.metrics.serve(config.metrics_host, config.metrics_port)
            log.info("metrics served address=http://%s:%d/metrics", config.metrics_host, port)
        self._stop = threading.Event()
        self._stop_reason = "stopped"
        self.exit_code = 0
        self.ctx: zmq.Context = zmq.Context.instance()
        self.curve: CurveServer | None = None
        if config.curve_key:
            self.curve = CurveServer(
                self.ctx,
                config.curve_key,
                {DATA: config.allow_workers, CONTROL: config.allow_admins},
            )
        else:
            log.warning(
                "plaintext (--insecure): anyone who reaches %s can join, send updates and read "
                "models; use CURVE keys beyond a network you trust",
                config.bind,
            )
        curve = self.curve
        self.sock, self.endpoint = router_socket(
            self.ctx, config.bind, secure=(lambda s: curve.apply(s, DATA)) if curve else None
        )
        self.control_sock, self.control_endpoint = router_socket(
            self.ctx,
            config.control or default_control(config.bind),
            secure=(lambda s: curve.apply(s, CONTROL)) if curve else None,
        )
        self.bytes_in = 0
        self.bytes_out = 0
        self.local = LocalPeers(
            config.shared_memory
        )  # workers on this host: tensors through /dev/shm
        backend = open_backend(config.membership, plugins.backends)
        self.core = CoordinatorCore(
            config, plugins, backend, backend.election(config.id, config.lease_ttl), self.local
        )
        self.control = ControlAPI(self.core)
        # Jobs load their newest checkpoint only once this coordinator leads, so a
        # standby that takes over resumes where the old leader stopped.
        if backend.shared:
            self.notifier.ready(
                "standing by for leadership"
            )  # a standby is a service that started fine
        self.core.election.campaign(self._leader_record(), tick=self.notifier.watchdog)
        try:
            self.core.begin_term(specs)
        except BaseException:  # e.g. a checkpoint of another job: hand leadership on at once
            self.sock.close(linger=0)
            self.control_sock.close(linger=0)
            self.core.election.resign()
            raise

    def _leader_record(self) -> LeaderRecord:
        return LeaderRecord(
            self.config.id,
            advertised(self.endpoint),
            advertised(self.control_endpoint),
            time.time(),
        )

    def _stand_by(self) -> bool:
        """After losing leadership: campaign again, then serve anew. False if stopped."""
        core = self.core
        core.end_term()
        core.election.step_down()
        log.warning("lost leadership: standing by; serving again if elected")
        self.notifier.status("standing by for leadership")
        while core.election.campaign(
            self._leader_record(), stop=self._stop, tick=self.notifier.watchdog
        ):
            try:
                core.begin_term([])
                return True
            except MembershipUnavailable as exc:  # the backend failed again: stand by again
                log.error("cannot serve after winning the election: %s", exc)
                core.election.step_down()
        return False

    # ---------------------------------------------------------------- loop --

    def run(self, install_signals: bool = True) -> None:
        core = self.core
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(
                    sig, lambda signum, _frame: self.stop(f"signal {signal.Signals(signum).name}")
                )
            signal.signal(signal.SIGHUP, lambda *_: self._reload_asked.set())
        log.info(
            "coordinator serving address=%s control=%s jobs=%s membership=%s",
            self.endpoint,
            self.control_endpoint,
            ",".join(core.engines) or "-",
            core.backend,
        )
        self.plugins.notify(
            "elastic_coordinator_started", address=self.endpoint, jobs=list(core.engines)
        )
        self.notifier.ready(core.status_line())
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.control_sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(timeout=50))
                leading = core.leading()
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
                core.tick()
                self._send_all(core.take())
                self._supervision()
                if self.config.exit_when_done and core.done:
                    self.stop("all jobs done")
        finally:
            self.plugins.notify("elastic_coordinator_stopping", reason=self._stop_reason)
            rejected = ",".join(f"{k}:{v}" for k, v in sorted(core.rejected.items())) or "none"
            shm_sent, shm_busy = self.local.counts()
            log.info(
                "coordinator stopping reason=%s bytes_in=%d bytes_out=%d shm_sent=%d shm_busy=%d "
                "rejected=%s",
                self._stop_reason,
                self.bytes_in,
                self.bytes_out,
                shm_sent,
                shm_busy,
                rejected,
            )
            self.sock.close(linger=0)
            self.control_sock.close(linger=0)
            self.local.close()
            if self.curve is not None:
                self.curve.stop()
            core.close()
            core.election.resign()
            self.notifier.close()
            if self.metrics is not None:
                self.metrics.close()

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
            self.notifier.status(self.core.status_line())
            if self.metrics is not None:
                figures = self.core.snapshot()
                figures["rejected"] |= self.curve.refused() if self.curve is not None else {}
                self.metrics.update(
                    figures | {"bytes_in": self.bytes_in, "bytes_out": self.bytes_out}
                )
        if self._reload_asked.is_set():
            self._reload_asked.clear()
            self._reload()

    def _reload(self) -> None:
        if self.reloader is None:
            log.warning(
                "SIGHUP ignored: this coordinator was not started from a configuration it can "
                "read again"
            )
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
        added = self.core.reload(self.config, specs)
        log.info(
            "configuration reloaded applied=%s new_jobs=%s needs_restart=%s",
            ",".join(applied) or "-",
            ",".join(added) or "-",
            ",".join(restart) or "-",
        )
        self.notifier.ready(self.core.status_line())

    # ------------------------------------------------------------ messages --

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
            self._send_all(self.core.take())

    def _handle(self, routing: bytes, frames: list[zmq.Frame]) -> None:
        self.bytes_in += sum(len(f) for f in frames)
        peer = routing.decode("utf-8", "replace")
        try:
            msg = decode(
                frames, max_message_bytes=self.config.max_message_bytes, shm=self.local.reader(peer)
            )
            if msg.sender != peer:
                raise ProtocolError(
                    "sender_mismatch",
                    f"header sender {msg.sender!r} is not the connection's id {peer!r}",
                )
        except ProtocolError as exc:
            self.core.reject(peer, "", exc.reason, exc.detail)
            return
        frames.clear()  # the message's tensors view them; the core lets go of those when folded
        self.core.receive(peer, msg)

    def _answer_control(self, routing: bytes, frames: list[zmq.Frame]) -> None:
        try:
            request = decode(frames, max_message_bytes=MAX_CONTROL_BYTES)
        except ProtocolError as exc:
            self.core.rejected[exc.reason] += 1
            reply = Message(
                MsgType.REPLY,
                meta={
                    "ok": False,
                    "data": {},
                    "code": "bad_request",
                    "error": f"{exc.reason}: {exc.detail}",
                },
            )
        else:
            reply = self.control.handle(request)
        try:
            send_message(self.control_sock, reply, routing)
        except zmq.ZMQError as exc:
            log.warning("cannot answer a control request error=%s", exc.strerror)

    def _send_all(self, outgoing: list[Outgoing]) -> None:
        pooled = {}
        for out in outgoing:
            ok, tracker = self._send(out.worker, out.message, track=out.buffers is not None)
            if not ok:
                self.core.unreachable(out.worker)
            if out.buffers is not None:
                out.buffers.attach(tracker)
                pooled[id(out.buffers)] = out.buffers
        for buffers in pooled.values():
            buffers.release()

    def _send(self, peer: str, msg: Message, track: bool = False) -> tuple[bool, Tracker | None]:
        """Whether it was sent, and (with ``track``) the tracker of its frames."""
        try:
            tracker = send_message(
                self.sock, msg, peer.encode(), track=track, lane=self.local.writer(peer)
            )
        except zmq.ZMQError as exc:
            log.warning("cannot send to peer=%r type=%s error=%s", peer, msg.type, exc.strerror)
            return False, None
        self.bytes_out += msg.payload_bytes
        return True, tracker
