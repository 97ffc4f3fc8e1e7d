"""The worker daemon: join, heartbeat, do work, send updates, and come back after outages.

The main thread owns the socket and never trains: it polls, sends heartbeats, and
hands WORK to one training thread, which wakes it through an inproc socket when an
update is ready. So heartbeats keep flowing during long local training, and a
worker is only declared dead when it really is.

When the coordinator goes silent for ``coordinator_timeout`` seconds, the worker
drops its connection and reconnects with exponential backoff (with jitter), then
joins again; a restarted coordinator that does not know it answers heartbeats with
``unknown_member`` and the worker joins again at once.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import socket
import threading
import time
from collections.abc import Callable

import torch
import zmq

from elastic import __version__
from elastic.allocator import tune_allocator
from elastic.config import WorkerConfig, apply_reload
from elastic.distributed.stores import StoreOpener
from elastic.errors import ElasticError, ProtocolError
from elastic.logs import setup_logging
from elastic.membership.cluster import ClusterBackend, Registration, open_backend
from elastic.plugins import Plugins
from elastic.sdnotify import Notifier
from elastic.security import client_security
from elastic.wire.buffers import Tracker
from elastic.wire.frames import decode
from elastic.wire.header import OFFER_MIN_BYTES, Message, MsgType
from elastic.wire.parts import check_grant, part_message
from elastic.wire.shm import Probe, SegmentReader, SegmentWriter, shm_available
from elastic.wire.transport import Secure, dealer_socket, recv_frames, send_message
from elastic.worker.devices import describe_device, resolve_device
from elastic.worker.exchanges import Exchanges
from elastic.worker.runner import Result, TaskRunner

__all__ = ["Worker"]

PREPARED = "prepared"  # the trainer built a job WELCOME named

log = logging.getLogger("elastic.worker")
BACKOFF_START, BACKOFF_MAX = 0.2, 10.0


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        plugins: Plugins,
        reloader: Callable[[], WorkerConfig] | None = None,
    ) -> None:
        tune_allocator()
        self.config = config
        self.plugins = plugins
        self.reloader = reloader  # SIGHUP: the configuration read again
        if config.curve_key:
            self._secure: Secure | None = client_security(config.curve_key, config.coordinator_key)
        else:
            self._secure = None
            log.warning(
                "plaintext (--insecure): updates and models travel unencrypted, to a coordinator "
                "not authenticated"
            )
        self.notifier = Notifier()
        self._reload_asked = threading.Event()
        self.id = config.id
        self.device = resolve_device(config.device)
        self._stop = threading.Event()
        self.runner = TaskRunner(plugins, self.device, config.data, self.id, cancel=self._stop)
        self.ctx = zmq.Context()
        # WORK for the trainer, or a job to build before its work (a WELCOME's ``jobs``).
        self._work: queue.Queue[Message | dict | None] = queue.Queue()
        # Results as the trainer makes them (one per virtual client); None: the WORK is
        # done; PREPARED: a job is built.
        self._results: queue.Queue[Result | Message | str | None] = queue.Queue()
        self._preparing = 0  # jobs queued for building: heartbeats say "preparing" meanwhile
        self._beat_now = False  # the preparing ended: say so at once
        # Results made and not yet sent or dropped: the trainer waits while there are
        # two, so a worker serving many clients holds about two updates, not one each.
        self._unsent = 0
        self._unsent_changed = threading.Condition()
        self._wake_addr = f"inproc://worker-wake-{id(self)}"
        self._wake = self.ctx.socket(zmq.PAIR)
        self._wake.bind(self._wake_addr)
        self._busy = False
        self._pending: dict[str, Message] = {}  # newest WORK per job, waiting for the trainer
        self._held: dict[str, Result] = {}  # big updates offered, by key, waiting for a GRANT
        self._sent_part: dict[
            str, Tracker | None
        ] = {}  # of an update sent in parts: the newest part's send
        self.sock: zmq.Socket | None = None
        # On the coordinator's host (it read our probe): tensors through /dev/shm.
        self._probe: Probe | None = None
        self._lane: SegmentWriter | None = None
        self._placed: SegmentReader | None = None
        self.shm_sent = self.shm_in_place = (
            0  # updates through /dev/shm; of those, sent with no copy
        )
        self.registration: Registration | None = None
        self.address = ""  # the coordinator of the current session
        self.runner.superseded = lambda job: job in self._pending
        self.exchanges = Exchanges(self._send_from_trainer, self._stop)
        self.runner.exchanges = self.exchanges
        self._trainer_wake: zmq.Socket | None = None  # the training thread's end of the wake
        self.runner.open_store = StoreOpener(lambda: self.address, config.membership)
        self.registered = False
        self.heartbeat_interval = 1.0
        self.rounds_done = 0

    # ------------------------------------------------------------ lifecycle --

    def run(self, install_signals: bool = True) -> None:
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
            signal.signal(signal.SIGHUP, lambda *_: self._reload_asked.set())
        # Registered (when asked) before anything else: an unreachable backend is one
        # clear error at start, and the record exists before the first HELLO.
        self.registration = self._register() if self.config.membership else None
        trainer = threading.Thread(target=self._train_loop, name="trainer", daemon=True)
        trainer.start()
        log.info(
            "worker starting worker=%s device=%s coordinator=%s",
            self.id,
            describe_device(self.device),
            self.config.coordinator or "(whoever leads)",
        )
        self.notifier.ready(f"starting on {describe_device(self.device)}")
        backoff = BACKOFF_START
        try:
            while not self._stop.is_set():
                address = self._coordinator_address()
                if address is None:
                    break
                if self._session(address):  # returns True when the session had joined
                    backoff = BACKOFF_START
                if self._stop.is_set():
                    break
                delay = backoff * random.uniform(0.8, 1.2)
                log.warning("coordinator unreachable coordinator=%s retry_in=%.1fs", address, delay)
                self.notifier.status(f"coordinator {address} unreachable; retrying")
                self._wait(delay)
                backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            if self.registration is not None:
                self.registration.close()  # the record goes at once: no waiting out the TTL
            self._work.put(None)
            # Training stops at its next batch; exiting with torch still running in
            # that thread can abort the interpreter's shutdown.
            trainer.join(timeout=30)
            self._wake.close(linger=0)
            if not trainer.is_alive():  # else its socket is open and term() would wait for it
                self.ctx.term()
            log.info(
                "worker stopped worker=%s rounds=%d shm_sent=%d shm_in_place=%d",
                self.id,
                self.rounds_done,
                self.shm_sent,
                self.shm_in_place,
            )
            self.notifier.close()

    def _register(self) -> Registration | None:
        record = {
            "id": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": describe_device(self.device),
            "software": __version__,
            "data": str(self.config.data or ""),
        }
        return open_backend(self.config.membership, self.plugins.backends).registration(
            self.id, record, self.config.lease_ttl
        )

    def stop(self) -> None:
        self._stop.set()
        self.notifier.stopping()

    def _wait(self, seconds: float) -> None:
        """Sleep until stopped, still petting the watchdog."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self._supervision()
            self._stop.wait(min(left, 1.0))

    def _supervision(self) -> None:
        """Called from every loop of the main thread: watchdog, and SIGHUP handled here."""
        self.notifier.watchdog()
        if self._reload_asked.is_set():
            self._reload_asked.clear()
            self._reload()

    def _reload(self) -> None:
        if self.reloader is None:
            log.warning(
                "SIGHUP ignored: this worker was not started from a configuration it can read again"
            )
            return
        self.notifier.reloading()
        try:
            applied, restart = apply_reload(self.config, self.reloader())
        except ElasticError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
        else:
            setup_logging(self.config.log_format, self.config.log_level)
            log.info(
                "configuration reloaded applied=%s needs_restart=%s",
                ",".join(applied) or "-",
                ",".join(restart) or "-",
            )
        self.notifier.ready()

    def _coordinator_address(self) -> str | None:
        """``--coordinator``, else the leader the cluster names (waited for); None if stopped."""
        if self.config.coordinator or self.registration is None:
            return self.config.coordinator
        waiting = False
        while not self._stop.is_set():
            self.registration.leader_changed.clear()
            try:
                leader = self.registration.leader()
            except Exception as exc:  # the backend away: keep waiting
                log.warning("cannot read the leader error=%s; retrying", type(exc).__name__)
                leader = None
            if leader is not None:
                return leader.address
            if not waiting:
                log.info(
                    "waiting for a coordinator to lead membership=%s",
                    ClusterBackend.describe_url(self.config.membership),
                )
                self.notifier.status("waiting for a coordinator to lead")
                waiting = True
            self._supervision()
            self.registration.leader_changed.wait(1.0)
        return None

    def _leader_moved(self, address: str) -> bool:
        """True when the cluster names another leader than the one this session talks to."""
        reg = self.registration
        if self.config.coordinator or reg is None or not reg.leader_changed.is_set():
            return False
        reg.leader_changed.clear()
        try:
            record = reg.leader()
        except Exception:  # the backend silent: that says nothing about our coordinator
            return False
        leader = record.address if record is not None else None
        if leader == address:
            return False
        log.warning(
            "the leading coordinator changed old=%s new=%s", address, leader or "(none yet)"
        )
        return True

    def _session(self, address: str) -> bool:
        """One connection to the coordinator, until it goes silent or we stop."""
        self.address = address
        self.sock = dealer_socket(self.ctx, self.id, address, secure=self._secure)
        self._probe = self._new_probe()
        self.registered = False
        joined = False
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        last_heard = time.monotonic()
        next_beat = 0.0
        try:
            while not self._stop.is_set():
                self._supervision()
                now = time.monotonic()
                if now >= next_beat or self._beat_now:
                    self._beat_now = False
                    self._send(
                        self._hello()
                        if not self.registered
                        else Message(
                            MsgType.HEARTBEAT,
                            meta={"busy": self._busy, "preparing": self._preparing > 0},
                        )
                    )
                    next_beat = now + (self.heartbeat_interval if self.registered else 0.5)
                if now - last_heard > self.config.coordinator_timeout or self._leader_moved(
                    address
                ):
                    return joined
                events = dict(poller.poll(timeout=max(1, int((next_beat - now) * 1000))))
                if self._wake in events:
                    self._wake.recv()
                    self._flush_results()
                if self.sock in events:
                    last_heard = time.monotonic()
                    self._drain()
                    joined = joined or self.registered
            if self.registered:
                self._say_goodbye()
            return joined
        finally:
            for key in list(self._held):  # offered to this coordinator only
                self._drop_held(key, "the session ended")
            self.sock.close(linger=0)
            self.sock = None
            self._shared_memory(False)
            if self._probe is not None:
                self._probe.close()
                self._probe = None

    def _new_probe(self) -> Probe | None:
        if not self.config.shared_memory or not shm_available():
            return None
        try:
            return Probe()
        except OSError as exc:
            log.warning(
                "no shared-memory path (tensors go on the socket): cannot write a probe: %s",
                exc.strerror,
            )
            return None

    def _shared_memory(self, on: bool) -> None:
        """Turn the /dev/shm path to the coordinator on or off (its ends made afresh)."""
        if self._lane is not None:
            self._lane.close()
            self.shm_sent += self._lane.sent
            self.shm_in_place += self._lane.in_place
        if self._placed is not None:
            self._placed.forget()
        self._lane = SegmentWriter() if on else None
        self._placed = SegmentReader() if on else None
        self.runner.placer = self._place if on else None

    def _place(self, like: dict[str, torch.Tensor], job: str) -> dict[str, torch.Tensor] | None:
        """For the trainer: room for a job's update in the segment to the coordinator."""
        lane = self._lane
        return lane.place(like, job) if lane is not None else None

    # ------------------------------------------------------------- messages --

    def _hello(self) -> Message:
        meta = {
            "device": describe_device(self.device),
            "host": socket.gethostname(),
            "software": __version__,
            "pid": os.getpid(),
            "prepares": True,  # it builds WELCOME's jobs before taking their work
        }
        if self._probe is not None:
            meta["shm"] = self._probe.describe()
        return Message(MsgType.HELLO, meta=meta)

    def _say_goodbye(self) -> None:
        """BYE, then wait (briefly) for the coordinator to acknowledge it: closing at
        once could let it see the connection drop before it reads the goodbye."""
        assert self.sock is not None
        self._send(Message(MsgType.BYE, key="bye"))
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0 and self.sock.poll(int(left * 1000) + 1):
            try:
                msg = decode(recv_frames(self.sock, routed=False)[1], check_finite=False)
            except ProtocolError:
                continue
            if msg.type is MsgType.ACK and msg.key == "bye":
                return
        log.warning("coordinator did not acknowledge the goodbye; it will notice by heartbeat")

    def _send(self, msg: Message, track: bool = False) -> Tracker | None:
        assert self.sock is not None
        msg.sender = self.id
        try:
            return send_message(self.sock, msg, track=track, lane=self._lane)
        except zmq.ZMQError as exc:
            log.warning("cannot send type=%s error=%s", msg.type, exc.strerror)
            return None

    def _drain(self) -> None:
        assert self.sock is not None
        while True:
            try:
                _, frames = recv_frames(self.sock, routed=False)
            except zmq.Again:
                return
            try:
                msg = decode(
                    frames,
                    max_message_bytes=self.config.max_message_bytes,
                    check_finite=False,
                    shm=self._placed,
                )
            except ProtocolError as exc:
                log.warning(
                    "bad message from coordinator reason=%s detail=%s", exc.reason, exc.detail
                )
                continue
            self._handle(msg)

    def _handle(self, msg: Message) -> None:
        if msg.type is MsgType.WELCOME:
            if not self.registered:
                log.info("joined coordinator=%s slot=%s", self.address, msg.meta.get("slot"))
                self.notifier.status(f"joined {self.address}")
                self._prepare(msg.meta.get("jobs", []))
            self.registered = True
            self.heartbeat_interval = float(msg.meta["heartbeat_interval"])
            local = msg.meta.get("shm") is True and self._probe is not None
            if local != (self._lane is not None):
                log.info(
                    "tensors to and from the coordinator go through %s",
                    "shared memory" if local else "the socket",
                )
                self._shared_memory(local)
        elif msg.type is MsgType.NACK:
            reason, detail = msg.meta["reason"], msg.meta["detail"]
            if reason == "unknown_member":
                if self.registered:
                    log.warning("coordinator forgot us (restarted?); joining again")
                self.registered = False
                self._send(self._hello())
            else:
                log.warning(
                    "coordinator refused job=%s round=%d reason=%s detail=%s",
                    msg.job,
                    msg.round,
                    reason,
                    detail,
                )
                if reason == "bad_shm":  # it does not read our segment (any more): use the socket
                    self._shared_memory(False)
                if msg.key in self._held:
                    self._drop_held(msg.key, f"refused: {reason}")
        elif msg.type is MsgType.GRANT:
            self._on_grant(msg)
        elif msg.type is MsgType.WORK:
            for key, held in list(self._held.items()):
                # The round it was for has closed (a collective report stays good).
                if held.message.job == msg.job and "collective" not in held.message.meta:
                    self._drop_held(key, "superseded by new work")
            self._pending[msg.job] = msg  # a newer round supersedes one not yet started
            self._feed()
        elif msg.type is MsgType.EXCHANGE:
            reply = self.exchanges.deliver(msg)
            if reply is not None:
                self._send(reply)
        elif msg.type is MsgType.ACK:
            self.rounds_done += 1
        elif msg.type is not MsgType.HEARTBEAT_ACK:
            log.warning("unexpected message type=%s from coordinator", msg.type)

    # ------------------------------------------------------------- training --

    def _prepare(self, jobs: list) -> None:
        """Have the trainer build the jobs it does not hold yet, before their work."""
        for entry in jobs:
            if not isinstance(entry, dict) or not isinstance(entry.get("job"), str):
                log.warning("WELCOME named a job badly entry=%.200r; skipping it", entry)
                continue
            if entry["job"] not in self.runner.jobs:
                self._preparing += 1
                self._work.put(entry)

    def _feed(self) -> None:
        if not self._busy and self._pending:
            job = next(iter(self._pending))
            self._busy = True
            self._work.put(self._pending.pop(job))

    def _flush_results(self) -> None:
        while True:
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                break
            if result is None:
                self._busy = False
                continue
            if isinstance(result, Message):  # an EXCHANGE the trainer said: out at once
                if self.sock is not None:
                    self._send(result)
                continue
            if result == PREPARED:
                self._preparing -= 1
                self._beat_now = self._preparing == 0
                continue
            assert isinstance(result, Result)
            msg = result.message
            if msg.key in self._held:  # (the same round asked again)
                self._release_held(msg.key)
            self._held[msg.key] = result
            if (
                self.sock is not None
                and msg.type is MsgType.UPDATE
                and msg.payload_bytes >= OFFER_MIN_BYTES
            ):
                # Big: offer it, and send it when the coordinator has room for it.
                # In parts, if the coordinator wants: not through shared memory (the
                # segment costs it nothing), nor compressed (decoded whole).
                parts = self._lane is None and not msg.encodings
                self._send(
                    Message(
                        MsgType.OFFER,
                        job=msg.job,
                        round=msg.round,
                        version=msg.version,
                        key=msg.key,
                        meta={"bytes": msg.payload_bytes, "parts": parts},
                    )
                )
            else:
                self._send_result(msg.key)
        self._feed()

    def _on_grant(self, grant: Message) -> None:
        """Send the granted update, or the one part of it the GRANT names."""
        try:
            part = check_grant(grant.meta)
            if part is None:
                self._send_result(grant.key)
                return
            result = self._held.get(grant.key)
            if result is None:
                log.debug("grant for an update no longer held key=%s", grant.key)
                return
            index, count, segments = part
            message = part_message(result.message, index, count, segments)
        except ProtocolError as exc:
            log.warning("bad GRANT key=%s: %s", grant.key, exc.detail)
            if grant.key in self._held:
                self._drop_held(grant.key, f"bad grant: {exc.reason}")
            return
        # Parts go out in order on one connection: the memory is free once the
        # newest part sent is (an update dropped halfway waits for that one too).
        tracker = self._send(message, track=result.buffers is not None)
        self._sent_part[grant.key] = tracker
        if index == count - 1:
            self._release_held(grant.key)

    def _send_result(self, key: str) -> None:
        result = self._held.pop(key, None)
        if result is None:
            log.debug("grant for an update no longer held key=%s", key)
            return
        self._gone()
        tracker = None
        if self.sock is not None:
            tracker = self._send(result.message, track=result.buffers is not None)
        if result.buffers is not None:
            result.buffers.release_after(tracker)

    def _drop_held(self, key: str, why: str) -> None:
        log.info("offered update dropped key=%s reason=%s", key, why)
        self._release_held(key)

    def _release_held(self, key: str) -> None:
        result = self._held.pop(key)
        self._gone()
        tracker = self._sent_part.pop(key, None)
        if result.buffers is not None:
            result.buffers.release_after(tracker)

    def _send_from_trainer(self, msg: Message) -> None:
        """An EXCHANGE the training thread says: queued for the receiving thread,
        which owns the socket, and woken (on the trainer's own end of the wake)."""
        self._results.put(msg)
        if self._trainer_wake is not None:
            self._trainer_wake.send(b"")

    def _gone(self) -> None:
        """A result was sent or dropped: room for the trainer's next."""
        with self._unsent_changed:
            self._unsent -= 1
            self._unsent_changed.notify_all()

    def _room_for_next(self, work: Message) -> bool:
        """Wait (on the trainer) until at most one result is unsent; False if the
        rest of ``work``'s clients are not wanted: the worker stops, or a newer
        WORK for the job came (the round closed)."""
        with self._unsent_changed:
            while self._unsent > 1 and not self._stop.is_set() and work.job not in self._pending:
                self._unsent_changed.wait(0.1)
        return not self._stop.is_set() and work.job not in self._pending

    def _train_loop(self) -> None:
        wake = self._trainer_wake = self.ctx.socket(zmq.PAIR)
        wake.connect(self._wake_addr)
        try:
            while True:
                work = self._work.get()
                if work is None:
                    return
                if isinstance(work, dict):  # a job to build before its work comes
                    self.runner.prepare(work)
                    self._results.put(PREPARED)
                    wake.send(b"")
                    continue
                for result in self.runner.results(work):  # one per virtual client
                    with self._unsent_changed:
                        self._unsent += 1
                    self._results.put(result)
                    wake.send(b"")
                    if "clients" in work.meta and not self._room_for_next(work):
                        break
                del work  # its tensors may view the coordinator's segment: let it reuse that now
                self._results.put(None)  # the WORK is done: the trainer is free
                wake.send(b"")
        finally:
            wake.close(linger=0)
