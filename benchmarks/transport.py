"""Transport: a 100M-parameter float32 model down to a worker and an update back.

Prints, all measured in this run, each path between two fresh processes over TCP
loopback (the sides of different paths never share a process, so each path gets
the allocator settings it would have in real life):

* ``copy``           an in-process copy of the same bytes (memory bandwidth);
* ``zmq-big``        bare pyzmq round trip, the payload as one frame each way;
* ``zmq-1mb``        bare pyzmq round trip, the payload as 1 MiB frames (copy=False);
* ``zmq-1mb-warm``   the same with the glibc settings the daemons apply at start
                     (``elastic.allocator``), to show what is transport and what is us;
* ``zmq-1mb-floor``  ``zmq-1mb-warm`` plus the two copies any framework on ZeroMQ
                     must make: the worker copies the received frames into its
                     model, the coordinator copies the reply into its model;
* ``elastic``        the daemons' own code: the coordinator's ``RoundEngine`` (a real
                     ``Job`` with the ``fedavg`` rule) sends WORK from the model's
                     memory and commits the round from the reply; the worker's
                     ``TaskRunner`` loads the frames into its model, "trains" (on an
                     empty shard) and sends its weights back.

The bare ``zmq-1mb`` path and ``elastic`` are measured again over ``ipc://`` (a Unix
socket: what a worker on the coordinator's own host may use), as ``ipc-zmq-1mb`` and
``ipc-elastic``. ``shm-elastic`` is the daemons' path for a worker on the
coordinator's host: the same code, with the tensors through a segment in
``/dev/shm`` each way (``elastic.wire.shm``) and only the headers on the socket;
the worker's weights live in its segment, so its update leaves with no copy.
The figures the issue sets a target for are ``elastic / zmq-1mb`` and
``ipc-elastic / ipc-zmq-1mb`` (target <= 1.2), and the rate of ``shm-elastic``
against ``copy``, the ceiling (target >= 0.5).

    python -m benchmarks.transport [--params 100_000_000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import zmq
from torch.utils.data import Dataset, TensorDataset

from benchmarks.plotting import bar_chart
from elastic.allocator import tune_allocator
from elastic.api import Shard, Task
from elastic.coordinator.job import Job
from elastic.coordinator.rounds import RoundEngine
from elastic.hookspecs import hookimpl
from elastic.jobspec import CheckpointPolicy, JobSpec
from elastic.membership.base import Member
from elastic.plugins import Plugins
from elastic.wire import CHUNK_BYTES, decode
from elastic.wire.shm import SegmentReader, SegmentWriter
from elastic.wire.transport import dealer_socket, recv_frames, router_socket, send_message
from elastic.worker.runner import TaskRunner

TENSORS = 4  # the model is a few big tensors, like the layers of a real network
MODES = (
    "zmq-big",
    "zmq-1mb",
    "zmq-1mb-warm",
    "zmq-1mb-floor",
    "elastic",
    "ipc-zmq-1mb",
    "ipc-elastic",
    "shm-elastic",
)


class Blob(Task):
    """A model of ``params`` float32 zeros in a few tensors, with an empty shard."""

    name = "blob"

    def build_model(self, seed: int) -> torch.nn.Module:
        model = torch.nn.Module()
        for i in range(TENSORS):
            model.register_parameter(
                f"layer{i}", torch.nn.Parameter(torch.zeros(self.params["params"] // TENSORS))
            )
        return model

    def train_dataset(self, shard: Shard, data_dir: Path | None) -> Dataset:
        return TensorDataset(torch.zeros(0, 1), torch.zeros(0))

    def test_dataset(self, data_dir: Path | None) -> Dataset:
        return self.train_dataset(Shard(0, 1), data_dir)

    def loss(
        self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return sum(p.sum() for p in model.parameters()) * 0.0


@hookimpl
def elastic_tasks() -> dict[str, type]:
    return [Blob]


def plugins() -> Plugins:
    return Plugins(extra=[sys.modules[__name__]])


def bare_socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    """Plain pyzmq defaults (no frame-size cap), unlimited queues like ours."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


def copy_frames(frames: list[zmq.Frame], into: torch.Tensor) -> None:
    flat, offset = into.view(torch.uint8), 0
    for frame in frames:
        raw = torch.frombuffer(frame.buffer, dtype=torch.uint8)
        flat[offset : offset + raw.numel()].copy_(raw)
        offset += raw.numel()


def worker_side(endpoint: str, mode: str, params: int, rounds: int) -> None:
    """Echo the bytes (bare paths) or run the worker daemon's TaskRunner."""
    lane, placed = (SegmentWriter(), SegmentReader()) if mode.startswith("shm-") else (None, None)
    mode = mode.removeprefix("ipc-").removeprefix(
        "shm-"
    )  # the same path, over a Unix socket or /dev/shm
    torch.set_num_threads(1)
    if mode != "zmq-1mb" and mode != "zmq-big":
        tune_allocator()  # what the daemons do at start
    ctx = zmq.Context()
    if mode == "elastic":
        sock = dealer_socket(ctx, "peer", endpoint)
        runner = TaskRunner(plugins(), torch.device("cpu"), None, "peer")
        runner.placer = (
            lane.place if lane is not None else None
        )  # as the worker daemon does (by job)
    else:
        sock = bare_socket(ctx, zmq.DEALER)
        sock.connect(endpoint)
        model = torch.empty(params)
    sock.send(b"ready")
    for _ in range(rounds):
        sock.poll()
        _, frames = recv_frames(sock, routed=False)
        if mode == "elastic":
            work = decode(frames, check_finite=False, shm=placed)
            if work.tensors:  # a WORK message, else the ACK of the last update
                result = runner.run(work)
                del (
                    work,
                    frames,
                )  # as the worker daemon does: the coordinator's segment is free again
                assert result.buffers is not None, result.message.meta
                result.buffers.release_after(
                    send_message(sock, result.message, track=True, lane=lane)
                )
                sock.poll()
                recv_frames(sock, routed=False)  # the ACK
            continue
        if mode == "zmq-1mb-floor":
            copy_frames(frames, model)  # the received model into the worker's model
        sock.send_multipart(frames, copy=False)
    sock.setsockopt(zmq.LINGER, 30_000)  # let the last reply leave before closing
    sock.close()
    ctx.term()
    if lane is not None:
        # every update went through /dev/shm, all but the first from where the weights live
        assert lane.sent == rounds and lane.in_place >= rounds - 1 and not lane.busy, (
            lane.sent,
            lane.in_place,
            lane.busy,
        )
        lane.close()


def elastic_engine(params: int, repeats: int, state_dir: str) -> RoundEngine:
    spec = JobSpec(
        id="bench",
        task="blob",
        rule="fedavg",
        rounds=repeats + 10,
        eval_every=0,
        round_timeout=600.0,
        task_params={"params": params},
        checkpoint=CheckpointPolicy(every=10**6),
    )
    return RoundEngine(Job(spec, plugins(), Path(state_dir)))


def send_round(
    sock: zmq.Socket, ident: bytes, engine: RoundEngine, lane: SegmentWriter | None
) -> None:
    """What ``Coordinator._send_all`` does with a round's WORK messages."""
    for out in engine.tick([Member(id="peer")]):
        tracker = send_message(sock, out.message, ident, track=True, lane=lane)
        if out.buffers is not None:
            out.buffers.attach(tracker)
            out.buffers.release()


def coordinator_side(mode: str, params: int, repeats: int, out: Any) -> None:
    """Time round trips; the first one warms connections and allocators and is dropped."""
    name, mode = mode, mode.removeprefix("ipc-").removeprefix("shm-")
    lane, placed = (SegmentWriter(), SegmentReader()) if name.startswith("shm-") else (None, None)
    torch.set_num_threads(1)
    if mode != "zmq-1mb" and mode != "zmq-big":
        tune_allocator()
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory() as state_dir:
        bind = f"ipc://{state_dir}/sock" if name.startswith("ipc-") else "tcp://127.0.0.1:*"
        if mode == "elastic":
            sock, endpoint = router_socket(ctx, bind)
            engine = elastic_engine(params, repeats, state_dir)
        else:
            sock = bare_socket(ctx, zmq.ROUTER)
            sock.bind(bind)
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            model = torch.randn(params)
            raw = memoryview(model.numpy()).cast("B")
            step = len(raw) if mode == "zmq-big" else CHUNK_BYTES
            parts = [raw[i : i + step] for i in range(0, len(raw), step)]
        peer = mp.get_context("spawn").Process(
            target=worker_side, args=(endpoint, name, params, repeats + 1)
        )
        peer.start()
        ident, _ = sock.recv_multipart()
        times = []
        for r in range(repeats + 1):
            start = time.perf_counter()
            if mode == "elastic":
                send_round(sock, ident, engine, lane)
                sock.poll()
                _, frames = recv_frames(sock, routed=True)
                reply = engine.on_update("peer", decode(frames, shm=placed))
                assert engine.job.round == r + 1, reply.meta  # committed
                del frames
            else:
                sock.send_multipart([ident, *parts], copy=False)
                sock.poll()
                frames = sock.recv_multipart(copy=False)
                if mode == "zmq-1mb-floor":
                    copy_frames(frames[1:], model)  # the reply into the coordinator's model
            if r:
                times.append(time.perf_counter() - start)
            if mode == "elastic":
                send_message(sock, reply, ident)
        peer.join()
        sock.close()
        ctx.term()
        if lane is not None:
            assert lane.sent == repeats + 1 and not lane.busy, (
                lane.sent,
                lane.busy,
            )  # every WORK went through /dev/shm
            lane.close()
        out.put((name, times))


def copy_baseline(params: int, repeats: int) -> list[float]:
    src, dst = torch.randn(params), torch.empty(params)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    mb = args.params * 4 / 1e6
    print(
        f"payload: {args.params:,} float32 parameters = {mb:.0f} MB each way; median of "
        f"{args.repeats} round trips"
    )
    results = {"copy": copy_baseline(args.params, args.repeats)}
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    for mode in MODES:  # one at a time: two cores, and the paths must not share them
        side = spawn.Process(target=coordinator_side, args=(mode, args.params, args.repeats, queue))
        side.start()
        got, times = queue.get()
        side.join()
        results[got] = times
    base = statistics.median(results["zmq-1mb"])
    print(f"{'path':<13} {'median ms':>10} {'min ms':>8} {'GB/s':>7} {'x zmq-1mb':>10}")
    rates: dict[str, float] = {}
    for mode, times in results.items():
        med = statistics.median(times)
        moved = mb * (1 if mode == "copy" else 2) / 1e3
        rates[mode] = moved / med
        print(
            f"{mode:<13} {med * 1e3:>10.1f} {min(times) * 1e3:>8.1f} {moved / med:>7.2f} "
            f"{med / base:>10.2f}"
        )
    elastic, warm, floor, ipc, ipc_base = (
        statistics.median(results[m])
        for m in ("elastic", "zmq-1mb-warm", "zmq-1mb-floor", "ipc-elastic", "ipc-zmq-1mb")
    )
    print(
        f"elastic / zmq-1mb = {elastic / base:.2f} (target <= 1.2); elastic / zmq-1mb-warm = "
        f"{elastic / warm:.2f}; elastic / zmq-1mb-floor = {elastic / floor:.2f}"
    )
    print(
        f"ipc-elastic / ipc-zmq-1mb = {ipc / ipc_base:.2f} (target <= 1.2); ipc-elastic moves "
        f"{rates['ipc-elastic'] / rates['copy']:.2f}x the in-process copy rate"
    )
    print(
        f"shm-elastic moves {rates['shm-elastic'] / rates['copy']:.2f}x the in-process copy rate "
        f"(target >= 0.5); {statistics.median(results['shm-elastic']) / base:.2f}x zmq-1mb's time"
    )
    bar_chart(
        "transport", f"model down + update up, {mb:.0f} MB each way: GB/s moved", rates, "GB/s"
    )


if __name__ == "__main__":
    main()
