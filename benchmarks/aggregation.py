"""Aggregation: FedAvg folding K = 8 updates of 25M float32 as they arrive, against
the memory-bandwidth limit of this machine, measured in the same run.

The coordinator's own code runs (a ``RoundEngine`` over a real ``Job``, rule
``fedavg``, task ``synthetic``): each update arrives as the frames a socket would hand
over (separate buffers, not the model's memory), and ``on_update`` decodes them,
checks them (shape, dtype, NaN/Inf) and folds them into the running weighted sum; the
last one commits the round (the mean written into the model).

The limit is what the bytes a streaming fold must touch cost at the copy rate: each
update is read once, the accumulator is read and written once per fold after the
first, and the mean is read once and written into the model once. The copy rate is
a large in-process ``copy_`` (bytes read + written per second). ``efficiency`` =
limit / measured (target >= 0.5).

    python -m benchmarks.aggregation [--params 25_000_000] [--updates 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.plotting import bar_chart
from elastic.coordinator.job import Job
from elastic.coordinator.rounds import RoundEngine
from elastic.jobspec import CheckpointPolicy, JobSpec
from elastic.membership.base import Member
from elastic.plugins import Plugins
from elastic.wire import Message, MsgType, WireTensor, decode, encode


def copy_rate(nbytes: int, repeats: int = 5) -> float:
    """Bytes read + written per second by an in-process copy of ``nbytes``."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * nbytes / best


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def received_frames(work: Message, worker: str, tensors: dict[str, torch.Tensor]) -> list[bytes]:
    """An update's frames as a socket hands them over: buffers of their own."""
    msg = Message(
        MsgType.UPDATE,
        job=work.job,
        round=work.round,
        version=work.version,
        sender=worker,
        key=f"{worker}/{work.job}/{work.round}",
        meta={"num_samples": 8, "loss": 1.0, "kind": "weights", "train_seconds": 0.0},
        tensors={k: WireTensor.from_tensor(v) for k, v in tensors.items()},
    )
    return [bytes(f) for f in encode(msg)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the coordinator's event loop folds on one core
    size = args.params * 4
    k = args.updates
    with tempfile.TemporaryDirectory() as state:
        spec = JobSpec(
            id="agg",
            task="synthetic",
            rule="fedavg",
            rounds=args.rounds + 10,
            min_workers=k,
            eval_every=0,
            round_timeout=600.0,
            task_params={"params": args.params},
            checkpoint=CheckpointPolicy(every=10**6),
        )
        engine = RoundEngine(Job(spec, Plugins(), Path(state)))
        members = [Member(id=f"w{i}") for i in range(k)]
        like = {n: p.detach() for n, p in engine.job.model.named_parameters()}
        updates = [{n: torch.randn_like(t) for n, t in like.items()} for _ in range(k)]
        per_round, per_update = [], []
        for r in range(args.rounds + 1):
            work = {out.worker: out.message for out in engine.tick(members)}
            arriving = [
                received_frames(work[m.id], m.id, updates[i]) for i, m in enumerate(members)
            ]
            start = time.perf_counter()
            for m, frames in zip(members, arriving, strict=True):
                t0 = time.perf_counter()
                reply = engine.on_update(m.id, decode(frames))
                assert reply.type == MsgType.ACK, reply.meta
                if r:
                    per_update.append(time.perf_counter() - t0)
            if r:  # the first round faults the accumulator in
                per_round.append(time.perf_counter() - start)
            assert engine.job.round == r + 1
            del arriving
    rate = copy_rate(size)
    touched = (
        k * size + 2 * (k - 1) * size + size + 2 * size
    )  # updates; accumulator RMW; first write; mean read + model write
    limit = touched / rate
    measured = statistics.median(per_round)
    print(
        f"{k} updates of {args.params:,} float32 ({size / 1e6:.0f} MB each), median of "
        f"{args.rounds} rounds after 1 warm-up"
    )
    print(
        f"copy rate (read + write): {rate / 1e9:.2f} GB/s; bytes a streaming fold touches: "
        f"{touched / 1e9:.2f} GB -> limit {limit * 1e3:.1f} ms"
    )
    print(
        f"fold of {k} updates + commit: {measured * 1e3:.1f} ms "
        f"({statistics.median(per_update) * 1e3:.1f} ms per update as it arrives)"
    )
    print(f"efficiency = limit / measured = {limit / measured:.2f} (target >= 0.5)")
    bar_chart(
        "aggregation",
        f"FedAvg over {k} x {size / 1e6:.0f} MB updates",
        {"memory-bandwidth limit": limit * 1e3, "elastic fold + commit": measured * 1e3},
        "ms",
    )


if __name__ == "__main__":
    main()
