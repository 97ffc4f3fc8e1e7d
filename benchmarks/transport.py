"""Transport: a 100M-parameter float32 model down to a worker and an update back.

Prints, all measured in this run, each path between two fresh processes over TCP
loopback (the sides of different paths never share a process, so each path gets
the allocator settings it would have in real life):

* ``copy``           an in-process copy of the same bytes (memory bandwidth: the floor);
* ``zmq-big``        bare pyzmq round trip, the payload as one frame each way;
* ``zmq-1mb``        bare pyzmq round trip, the payload as 1 MiB frames (copy=False);
* ``zmq-1mb-warm``   the same with the glibc settings the daemons apply at start
                     (``elastic.allocator``), to show what is transport and what is us;
* ``elastic``        the daemons' own path: the round engine's model snapshot into a
                     pooled buffer, encode + send from a ROUTER, the worker's decode
                     and load into its model's parameters, its update (trained minus
                     received weights) built in pooled memory and sent back, and the
                     coordinator's decode with NaN/Inf validation and FedAvg fold.

The figure the issue sets a target for is ``elastic / zmq-1mb`` (target <= 1.2).

    python benchmarks/transport.py [--params 100_000_000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch
import zmq
from elastic_plugins.fedavg import FedAvg

from elastic.allocator import tune_allocator
from elastic.api import Update
from elastic.plugins import Plugins
from elastic.wire import CHUNK_BYTES, Message, MsgType, WireTensor, decode
from elastic.wire.buffers import BufferPool
from elastic.wire.transport import dealer_socket, recv_frames, router_socket, send_message
from elastic.worker.runner import TaskRunner

TENSORS = 4  # the model is a few big tensors, like the layers of a real network
MODES = ("zmq-big", "zmq-1mb", "zmq-1mb-warm", "elastic")


def make_model(params: int) -> torch.nn.Module:
    model = torch.nn.Module()
    for i in range(TENSORS):
        model.register_parameter(f"layer{i}", torch.nn.Parameter(torch.zeros(params // TENSORS)))
    return model


def bare_socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    """Plain pyzmq defaults (no frame-size cap), unlimited queues like ours."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


def worker_side(endpoint: str, mode: str, params: int, rounds: int) -> None:
    """Echo the bytes (bare paths) or run the worker's receive/load/update path."""
    torch.set_num_threads(1)
    if mode in ("elastic", "zmq-1mb-warm"):
        tune_allocator()
    ctx = zmq.Context()
    if mode == "elastic":
        sock = dealer_socket(ctx, "peer", endpoint)
        model = make_model(params)
        runner = TaskRunner(Plugins(), torch.device("cpu"), None, "peer")
    else:
        sock = bare_socket(ctx, zmq.DEALER)
        sock.connect(endpoint)
    sock.send(b"ready")
    for _ in range(rounds):
        sock.poll()
        frames = sock.recv_multipart(copy=False)
        if mode != "elastic":
            sock.send_multipart(frames, copy=False)
            continue
        work = decode(frames, check_finite=False)
        runner._load(model, work.tensors)  # frames -> the model's parameters
        # (local training would happen here)
        update = runner.updates.delta_from_wire(model.state_dict(), work.tensors)
        meta = {"num_samples": 1, "loss": 0.0, "kind": "delta", "train_seconds": 0.0}
        msg = Message(MsgType.UPDATE, job="b", round=work.round, version=work.version, sender="peer", key=f"peer/b/{work.round}", meta=meta, tensors={k: WireTensor.from_tensor(v) for k, v in update.tensors.items()})
        update.release_after(send_message(sock, msg, track=True))
    sock.setsockopt(zmq.LINGER, 30_000)  # let the last reply leave before closing
    sock.close()
    ctx.term()


def coordinator_side(mode: str, params: int, repeats: int, out: mp.Queue) -> None:
    """Time round trips; the first one warms connections and allocators and is dropped."""
    torch.set_num_threads(1)
    if mode in ("elastic", "zmq-1mb-warm"):
        tune_allocator()
    ctx = zmq.Context()
    if mode == "elastic":
        sock, endpoint = router_socket(ctx, "tcp://127.0.0.1:0")
        model = make_model(params)
        agg = FedAvg({})
        agg.setup(model)
        pool = BufferPool()
    else:
        sock = bare_socket(ctx, zmq.ROUTER)
        endpoint = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
        raw = memoryview(torch.randn(params).numpy()).cast("B")
        step = len(raw) if mode == "zmq-big" else CHUNK_BYTES
        parts = [raw[i : i + step] for i in range(0, len(raw), step)]
    peer = mp.get_context("spawn").Process(target=worker_side, args=(endpoint, mode, params, repeats + 1))
    peer.start()
    ident, _ = sock.recv_multipart()
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        if mode == "elastic":
            snapshot = pool.copy_of(model.state_dict())  # what RoundEngine does per round
            meta = {"mode": "train", "task": "-", "task_params": {}, "train": {}, "shard": [0, 1], "seed": 0}
            work = Message(MsgType.WORK, job="b", round=r + 1, version=r, key="k", meta=meta, tensors={k: WireTensor.from_tensor(v) for k, v in snapshot.tensors.items()})
            snapshot.release_after(send_message(sock, work, ident, track=True))
            sock.poll()
            _, frames = recv_frames(sock, routed=True)
            msg = decode(frames)
            agg.begin_round()
            agg.accumulate(Update("peer", msg.version, 1, 0.0, "delta", msg.tensors))
            agg.finalize()
            del msg, frames
        else:
            sock.send_multipart([ident, *parts], copy=False)
            sock.poll()
            sock.recv_multipart(copy=False)
        if r:
            times.append(time.perf_counter() - start)
    peer.join()
    sock.close()
    ctx.term()
    out.put((mode, times))


def copy_baseline(params: int, repeats: int) -> list[float]:
    src, dst = torch.randn(params), torch.empty(params)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    mb = args.params * 4 / 1e6
    print(f"payload: {args.params:,} float32 parameters = {mb:.0f} MB each way; median of {args.repeats} round trips")
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
    for mode, times in results.items():
        med = statistics.median(times)
        moved = mb * (1 if mode == "copy" else 2) / 1e3
        print(f"{mode:<13} {med * 1e3:>10.1f} {min(times) * 1e3:>8.1f} {moved / med:>7.2f} {med / base:>10.2f}")
    elastic = statistics.median(results["elastic"])
    print(f"elastic / zmq-1mb = {elastic / base:.2f} (target <= 1.2); elastic / zmq-1mb-warm = {elastic / statistics.median(results['zmq-1mb-warm']):.2f}")


if __name__ == "__main__":
    main()
