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
"""

from __future__ import annotations

from collections.abc import Mapping
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
from elastic.worker.runner import Result, TaskRunner

__all__ = ["simulate", "SimulatedClock"]

STEP = 0.001  # simulated seconds per pass: deadlines and heartbeat timeouts never pass on their own


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
) -> Job:
    """Run ``spec`` to its end with ``workers`` simulated workers; the finished job.

    ``attackers`` makes some of them Byzantine, to try robust rules: worker index ->
    ``"signflip:F"`` (its update's change scaled by -F) or ``"noise:S"`` (a change
    of Gaussian noise with standard deviation S instead of the real one).
    """
    if workers < max(spec.min_workers, 1):
        raise ConfigError(
            f"job {spec.id} needs min_workers = {spec.min_workers}; simulate at least that many "
            "workers"
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
        while not job.done:
            clock.now += STEP
            for worker in runners:
                core.receive(
                    worker, Message(MsgType.HEARTBEAT, sender=worker, meta={"busy": False})
                )
            core.tick()
            work_out = [out for out in core.take() if out.message.type is MsgType.WORK]
            if not work_out and not job.done:
                raise ElasticError(
                    f"job {spec.id} stopped making progress at round {job.round} ({job.state})"
                )
            for out in work_out:
                work = decode(encode(out.message), check_finite=False)
                if out.buffers is not None:  # what the daemon does once the WORK is sent
                    out.buffers.release()
                for result in runners[out.worker].results(work):  # one per virtual client
                    _answer(core, out.worker, work, result, attacks.get(out.worker))
                    core.take()  # the ACKs and NACKs: nobody to send them to
    finally:
        core.close()
    return job


def _answer(
    core: CoordinatorCore,
    worker: str,
    work: Message,
    result: Result,
    attacked: tuple[str, float] | None,
) -> None:
    """The worker's reply to its WORK, through the wire's encoding, to the core."""
    try:
        reply = decode(encode(result.message), max_message_bytes=1 << 62)
    except ProtocolError as exc:  # e.g. NaN in the update: the worker's work failed, as on the wire
        reply = Message(
            MsgType.NACK,
            job=work.job,
            round=work.round,
            version=work.version,
            key=result.message.key,
            meta={"reason": exc.reason, "detail": exc.detail},
        )
    reply.sender = worker
    if reply.type is MsgType.UPDATE and attacked is not None:
        attack(reply, work, *attacked)
    core.receive(worker, reply)
    if result.buffers is not None:
        result.buffers.release()


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
