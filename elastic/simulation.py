"""A job in one process: the coordinator's real core and the real worker runtime, no
sockets.

For trying a rule or its hyper-parameters quickly, the way Flower's simulation
engine is used. The coordinator is the daemon's own ``CoordinatorCore`` on the
embedded backend, driven by hand on a clock of its own: the simulated workers say
HELLO and send heartbeats, each is a ``TaskRunner`` given its WORK in turn, and
every message still goes through ``encode``/``decode`` (zero-copy here), so updates
are validated as on the wire; the core's engines commit, evaluate and checkpoint
exactly as in the daemon. Asynchronous rules see the staleness that serving the
workers one after another produces.

With client speeds (``ClientSpeeds``: ``elastic simulate --client-speed``) each
update arrives after a simulated training time, samples x epochs x
``sample_seconds`` divided by its client's speed, on the simulated clock: a
round's deadline (``round_timeout``, in simulated seconds) then leaves slow clients
out, as it would on devices, and the history's round ``seconds`` are simulated.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from elastic.config import CoordinatorConfig
from elastic.coordinator.core import CoordinatorCore
from elastic.coordinator.job import Job
from elastic.errors import ConfigError, ElasticError, ProtocolError
from elastic.jobspec import JobSpec
from elastic.membership.cluster import LeaderRecord
from elastic.membership.embedded import EmbeddedBackend
from elastic.plugins import Plugins
from elastic.wire.frames import decode, encode
from elastic.wire.header import Message, MsgType
from elastic.wire.shm import LocalPeers
from elastic.wire.tensors import WireTensor
from elastic.worker.runner import Result, TaskRunner, client_works

__all__ = ["simulate", "SimulatedClock"]

STEP = 0.001  # simulated seconds per pass: deadlines and heartbeat timeouts never pass on their own


@dataclass(frozen=True)
class ClientSpeeds:
    """How fast each simulated client trains: its speed is drawn once, log-normal
    with median 1 and spread ``sigma`` (0: all alike), from ``seed``; an update
    takes samples x epochs x ``sample_seconds`` / speed simulated seconds."""

    sigma: float
    sample_seconds: float = 0.01
    seed: int = 0

    @classmethod
    def parse(cls, text: str, sample_seconds: float, seed: int) -> ClientSpeeds:
        kind, _, arg = text.partition(":")
        try:
            sigma = float(arg)
        except ValueError:
            sigma = -1.0
        if kind != "lognormal" or not 0 <= sigma <= 10 or not sample_seconds > 0:
            raise ConfigError(
                f"client speed {text!r} (sample time {sample_seconds}): use lognormal:SIGMA with "
                "SIGMA in [0, 10], e.g. --client-speed lognormal:1.0, and a sample time > 0"
            )
        return cls(sigma, sample_seconds, seed)

    def speed(self, client: str) -> float:
        return math.exp(random.Random(f"{self.seed}/{client}").gauss(0.0, self.sigma))

    def seconds(self, client: str, samples: int, epochs: int) -> float:
        return samples * epochs * self.sample_seconds / self.speed(client)


class SimulatedClock:
    """The core's monotonic clock, moved on by the simulation."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(
    spec: JobSpec,
    workers: int,
    plugins: Plugins,
    state_dir: Path,
    data_dir: Path | None = None,
    attackers: Mapping[int, str] | None = None,
    speeds: ClientSpeeds | None = None,
) -> Job:
    """Run ``spec`` to its end with ``workers`` simulated workers; the finished job.

    ``attackers`` makes some of them Byzantine, to try robust rules: worker index ->
    ``"signflip:F"`` (its update's change scaled by -F) or ``"noise:S"`` (a change
    of Gaussian noise with standard deviation S instead of the real one).
    ``speeds``: each update arrives after its client's simulated training time.
    """
    if workers < max(spec.min_workers, 1):
        raise ConfigError(
            f"job {spec.id} needs min_workers = {spec.min_workers}; simulate at least that many "
            "workers"
        )
    mechanism = spec.privacy.get("mechanism")
    if mechanism and plugins.privacy.get(mechanism).interactive:
        raise ConfigError(
            f"job {spec.id}: privacy mechanism {mechanism} talks with each worker during a "
            "round, and simulate runs them in one thread; use elastic run JOB.toml "
            f"--local-workers {max(spec.min_workers, 3)} instead"
        )
    if plugins.rule(spec.rule).worker_mode == "collective":
        raise ConfigError(
            f"job {spec.id}: rule {spec.rule} trains its workers together, one process each "
            "(torch.distributed), and simulate runs them all in one; use elastic run JOB.toml "
            f"--local-workers {max(spec.min_workers, 2)} instead"
        )
    attacks = {f"sim-{i}": parse_attack(a) for i, a in (attackers or {}).items()}
    clock = SimulatedClock()
    backend = EmbeddedBackend("embedded://")
    core = CoordinatorCore(
        CoordinatorConfig(state_dir=state_dir, shared_memory=False),
        plugins,
        backend,
        backend.election("simulate", 10.0),
        LocalPeers(False),
        clock=clock,
    )
    core.election.campaign(LeaderRecord("simulate", "inproc://simulate"))
    try:
        core.begin_term([spec])
        job = core.engines[spec.id].job
        runners = {
            f"sim-{i}": TaskRunner(plugins, torch.device("cpu"), data_dir, f"sim-{i}")
            for i in range(workers)
        }
        for worker in runners:
            core.receive(
                worker,
                Message(
                    MsgType.HELLO,
                    sender=worker,
                    meta={"device": "cpu", "host": "simulation", "software": "", "pid": 0},
                ),
            )
        # Updates on their way (with client speeds): (when, order, worker, work, reply).
        arriving: list[tuple[float, int, str, Message, Message]] = []
        order = itertools.count()
        engine = core.engines[spec.id]
        idle = 0  # passes in a row with nothing handed out nor on its way
        while not job.done:
            clock.now += STEP
            for worker in runners:
                core.receive(
                    worker, Message(MsgType.HEARTBEAT, sender=worker, meta={"busy": False})
                )
            core.tick()  # a deadline passed on the way closes its round first
            while arriving and arriving[0][0] <= clock.now:
                _, _, worker, work, reply = heapq.heappop(arriving)
                _deliver(core, worker, work, reply, attacks.get(worker))
            work_out = [out for out in core.take() if out.message.type is MsgType.WORK]
            if not work_out and arriving and engine.in_flight:  # all handed out: on to the
                deadline = engine.deadline  # next arrival, or the deadline if that comes first
                next_at = min(arriving[0][0], deadline if deadline is not None else math.inf)
                clock.now = max(clock.now, next_at - STEP)
            idle = 0 if work_out or arriving else idle + 1
            if idle > 1 and not job.done:
                raise ElasticError(
                    f"job {spec.id} stopped making progress at round {job.round} ({job.state})"
                )
            for out in work_out:
                work = decode(encode(out.message), check_finite=False)
                if out.buffers is not None:  # what the daemon does once the WORK is sent
                    out.buffers.release()
                attacked = attacks.get(out.worker)
                epochs: dict[int | None, int] = {}  # the local epochs asked, by client
                for result in runners[out.worker].results(work):  # one per virtual client
                    if speeds is None:
                        _deliver(core, out.worker, work, _reply(work, result), attacked)
                        if result.buffers is not None:  # the core has read it
                            result.buffers.release()
                        continue
                    reply = _reply(work, result, copy=True)  # it waits; the worker trains on
                    if result.buffers is not None:
                        result.buffers.release()
                    if reply.type is not MsgType.UPDATE:
                        _deliver(core, out.worker, work, reply, attacked)
                        continue
                    client = reply.meta.get("client")
                    epochs = epochs or {
                        unit.meta.get("client"): unit.meta["train"]["local_epochs"]
                        for unit in client_works(work)  # (an UPDATE came: they are sound)
                    }
                    seconds = speeds.seconds(
                        str(out.worker if client is None else client),
                        reply.meta["num_samples"],
                        epochs[client],
                    )
                    heapq.heappush(
                        arriving, (clock.now + seconds, next(order), out.worker, work, reply)
                    )
    finally:
        core.close()
    return job


def _reply(work: Message, result: Result, copy: bool = False) -> Message:
    """The worker's reply to its WORK, through the wire's encoding (``copy``: into
    memory of its own, not the worker's)."""
    try:
        frames = encode(result.message)
        reply = decode([bytes(f) for f in frames] if copy else frames, max_message_bytes=1 << 62)
    except ProtocolError as exc:  # e.g. NaN in the update: the worker's work failed, as on the wire
        reply = Message(
            MsgType.NACK,
            job=work.job,
            round=work.round,
            version=work.version,
            key=result.message.key,
            meta={"reason": exc.reason, "detail": exc.detail},
        )
    return reply


def _deliver(
    core: CoordinatorCore,
    worker: str,
    work: Message,
    reply: Message,
    attacked: tuple[str, float] | None,
) -> None:
    """A reply reaches the core."""
    reply.sender = worker
    if reply.type is MsgType.UPDATE and attacked is not None:
        attack(reply, work, *attacked)
    core.receive(worker, reply)
    core.take()  # the ACKs and NACKs: nobody to send them to


def parse_attack(text: str) -> tuple[str, float]:
    kind, _, arg = text.partition(":")
    try:
        value = float(arg)
    except ValueError:
        value = -1.0
    if kind not in ("signflip", "noise") or value <= 0:
        raise ConfigError(f"attack {text!r}: use signflip:FACTOR or noise:STDDEV, e.g. signflip:10")
    return kind, value


def attack(update: Message, work: Message, kind: str, value: float) -> None:
    """Replace a worker's update the way a Byzantine worker would."""
    relative = update.meta["kind"] == "weights"  # the change is weights minus what was sent
    for name, wt in list(update.tensors.items()):
        sent = wt.to_tensor()
        base = (
            work.tensors[name].to_tensor().reshape(sent.shape).to(sent.dtype)
            if relative
            else torch.zeros_like(sent)
        )
        change = sent - base
        change = -value * change if kind == "signflip" else torch.randn_like(change) * value
        update.tensors[name] = WireTensor.from_tensor(base + change)
