"""A job in one process: the real engine and the real worker runtime, no sockets.

For trying a rule or its hyper-parameters quickly, the way Flower's simulation
engine is used: each simulated worker is a ``TaskRunner`` of its own, given the
engine's WORK in turn; every message still goes through ``encode``/``decode``
(zero-copy here), so updates are validated as on the wire; the engine commits,
evaluates and checkpoints exactly as in the coordinator daemon. Asynchronous rules
see the staleness that serving the workers one after another produces.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from elastic.coordinator.asynchronous import AsyncEngine
from elastic.coordinator.engine import Engine
from elastic.coordinator.job import Job
from elastic.coordinator.rounds import RoundEngine
from elastic.errors import ConfigError, ElasticError, ProtocolError
from elastic.jobspec import JobSpec
from elastic.membership.base import Member
from elastic.plugins import Plugins
from elastic.rules import AsyncAggregator
from elastic.wire.frames import decode, encode
from elastic.wire.header import Message, MsgType
from elastic.wire.tensors import WireTensor
from elastic.worker.runner import TaskRunner

__all__ = ["simulate"]


def simulate(
    spec: JobSpec, workers: int, plugins: Plugins, state_dir: Path, data_dir: Path | None = None, attackers: Mapping[int, str] | None = None
) -> Job:
    """Run ``spec`` to its end with ``workers`` simulated workers; the finished job.

    ``attackers`` makes some of them Byzantine, to try robust rules: worker index ->
    ``"signflip:F"`` (its update's change scaled by -F) or ``"noise:S"`` (a change
    of Gaussian noise with standard deviation S instead of the real one).
    """
    if workers < max(spec.min_workers, 1):
        raise ConfigError(f"job {spec.id} needs min_workers = {spec.min_workers}; simulate at least that many workers")
    attacks = {f"sim-{i}": parse_attack(a) for i, a in (attackers or {}).items()}
    job = Job(spec, plugins, state_dir)
    kind = AsyncEngine if isinstance(job.aggregator, AsyncAggregator) else RoundEngine
    engine: Engine = kind(job, plugins.notify, ask=plugins.first_answer)
    members = [Member(id=f"sim-{i}", slot=i) for i in range(workers)]
    runners = {m.id: TaskRunner(plugins, torch.device("cpu"), data_dir, m.id) for m in members}
    while not job.done:
        outgoing = engine.tick(members)
        if not outgoing and not job.done:
            raise ElasticError(f"job {spec.id} stopped making progress at round {job.round} ({job.state})")
        for out in outgoing:
            work = decode(encode(out.message), check_finite=False)
            result = runners[out.worker].run(work)
            try:
                reply = decode(encode(result.message), max_message_bytes=1 << 62)
            except ProtocolError as exc:  # e.g. NaN in the update: refused, as on the wire
                engine.on_worker_failed(out.worker, work.round, f"{exc.reason}: {exc.detail}")
                continue
            if reply.type is MsgType.UPDATE:
                reply.sender = out.worker
                if out.worker in attacks:
                    attack(reply, work, *attacks[out.worker])
                engine.on_update(out.worker, reply)
            else:
                engine.on_worker_failed(out.worker, work.round, f"{reply.meta['reason']}: {reply.meta['detail']}")
            if result.buffers is not None:
                result.buffers.release()
    return job


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
        base = work.tensors[name].to_tensor().reshape(sent.shape).to(sent.dtype) if relative else torch.zeros_like(sent)
        change = sent - base
        change = -value * change if kind == "signflip" else torch.randn_like(change) * value
        update.tensors[name] = WireTensor.from_tensor(base + change)
