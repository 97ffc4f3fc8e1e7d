"""A job in one process: the real engine and the real worker runtime, no sockets.

For trying a rule or its hyper-parameters quickly, the way Flower's simulation
engine is used: each simulated worker is a ``TaskRunner`` of its own, given the
engine's WORK in turn; every message still goes through ``encode``/``decode``
(zero-copy here), so updates are validated as on the wire; the engine commits,
evaluates and checkpoints exactly as in the coordinator daemon. Asynchronous rules
see the staleness that serving the workers one after another produces.
"""

from __future__ import annotations

from pathlib import Path

import torch

from elastic.api import AsyncAggregator
from elastic.coordinator.asynchronous import AsyncEngine
from elastic.coordinator.engine import Engine
from elastic.coordinator.job import Job
from elastic.coordinator.rounds import RoundEngine
from elastic.errors import ConfigError, ElasticError, ProtocolError
from elastic.jobspec import JobSpec
from elastic.membership.base import Member
from elastic.plugins import Plugins
from elastic.wire.frames import decode, encode
from elastic.wire.messages import MsgType
from elastic.worker.runner import TaskRunner

__all__ = ["simulate"]


def simulate(spec: JobSpec, workers: int, plugins: Plugins, state_dir: Path, data_dir: Path | None = None) -> Job:
    """Run ``spec`` to its end with ``workers`` simulated workers; the finished job."""
    if workers < max(spec.min_workers, 1):
        raise ConfigError(f"job {spec.id} needs min_workers = {spec.min_workers}; simulate at least that many workers")
    job = Job(spec, plugins, state_dir)
    kind = AsyncEngine if isinstance(job.aggregator, AsyncAggregator) else RoundEngine
    engine: Engine = kind(job, plugins.notify)
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
                engine.on_update(out.worker, reply)
            else:
                engine.on_worker_failed(out.worker, work.round, f"{reply.meta['reason']}: {reply.meta['detail']}")
            if result.buffers is not None:
                result.buffers.release()
    return job
