"""Light workers: many protocol-faithful workers in one process, for load.

Each has its own DEALER socket and identity and speaks the worker's side of the
protocol: HELLO, heartbeats, and for every WORK an UPDATE computed against the
version it was given (big ones OFFERed first and sent when GRANTed, in parts if the
coordinator asks). Its "training"
returns the received weights as they are, from the received frames (or a delta of
zeros), so a few hundred of them fit on one machine and what is measured is the
coordinator. Real workers (``elastic worker``) each hold a torch runtime and a
model; 64 of them at 100 MB would not fit here.

One thread serves all of a process's sockets from one poll loop: a thread per
worker spends more time switching the GIL than speaking the protocol, and would be
what limits a benchmark of the coordinator. Several processes spread them further.

    python -m benchmarks.light_workers --coordinator tcp://127.0.0.1:5555 --count 64
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import signal
import socket
import threading
import time

import torch
import zmq

from elastic import __version__
from elastic.wire import Message, MsgType, WireTensor, decode
from elastic.wire.header import OFFER_MIN_BYTES
from elastic.wire.parts import check_grant, part_message
from elastic.wire.transport import dealer_socket, recv_frames, send_message


class LightWorker:
    """One worker's state; its socket is served by ``Swarm``'s loop."""

    def __init__(self, sock: zmq.Socket, wid: str) -> None:
        self.sock, self.wid = sock, wid
        self.beat, self.next_beat = 1.0, 0.0
        self.updates = 0
        self.held: dict[str, Message] = {}
        self.hello = Message(
            MsgType.HELLO,
            meta={
                "device": "cpu (light)",
                "host": socket.gethostname(),
                "software": __version__,
                "pid": os.getpid(),
            },
        )

    def send(self, msg: Message) -> None:
        msg.sender = self.wid
        try:
            send_message(self.sock, msg)
        except zmq.Again:  # the coordinator is gone or slow: as a real worker, retry by heartbeat
            pass

    def heartbeat(self, now: float) -> None:
        self.send(Message(MsgType.HEARTBEAT, meta={"busy": False}))
        self.next_beat = now + self.beat

    def answer(
        self, work: Message, zeros: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor]
    ) -> None:
        mode = work.meta["mode"]
        if mode == "train":  # the trained weights: the received ones, from the received frames
            tensors, kind = work.tensors, "weights"
        else:  # a delta or a gradient of zeros, one shared tensor per shape
            tensors = {}
            for k, t in work.tensors.items():
                shape = tuple(t.shape)
                zero = zeros.get((shape, t.dtype))
                if zero is None:
                    zero = zeros[(shape, t.dtype)] = torch.zeros(shape, dtype=t.dtype)
                tensors[k] = WireTensor.from_tensor(zero)
            kind = "delta" if mode == "delta" else "gradient"
        update = Message(
            MsgType.UPDATE,
            job=work.job,
            round=work.round,
            version=work.version,
            key=work.key,
            meta={"num_samples": 8, "loss": 0.5, "kind": kind, "train_seconds": 0.0},
            tensors=tensors,
        )
        if update.payload_bytes >= OFFER_MIN_BYTES:
            self.held = {update.key: update}  # only the newest is worth sending
            self.send(
                Message(
                    MsgType.OFFER,
                    job=work.job,
                    round=work.round,
                    version=work.version,
                    key=update.key,
                    meta={"bytes": update.payload_bytes, "parts": True},
                )
            )
        else:
            self.send(update)

    def granted(self, grant: Message) -> None:
        """Send the granted update, or the part of it the GRANT names."""
        update = self.held.get(grant.key)
        part = check_grant(grant.meta)
        if update is None:
            return
        if part is None:
            self.send(self.held.pop(grant.key))
            return
        index, count, segments = part
        self.send(part_message(update, index, count, segments))
        if index == count - 1:
            del self.held[grant.key]


class Swarm:
    """``count`` light workers served by one loop; each WORK is answered ``delay``
    seconds after it came (pretend training), without holding up the others."""

    def __init__(self, address: str, count: int, prefix: str, delay: float = 0.0) -> None:
        self.ctx = zmq.Context()
        self.delay = delay
        self.workers = [
            LightWorker(dealer_socket(self.ctx, f"{prefix}{i}", address), f"{prefix}{i}")
            for i in range(count)
        ]
        self.by_socket = {w.sock: w for w in self.workers}
        self.zeros: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}
        self.due: list[
            tuple[float, int, LightWorker, Message]
        ] = []  # answers waiting out the delay
        self.seq = itertools.count()

    @property
    def updates(self) -> int:
        return sum(w.updates for w in self.workers)

    def run(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        for w in self.workers:
            poller.register(w.sock, zmq.POLLIN)
            w.send(w.hello)
        beats_checked = 0.0
        try:
            while not stop.is_set():
                now = time.monotonic()
                while self.due and self.due[0][0] <= now:
                    _, _, w, work = heapq.heappop(self.due)
                    w.answer(work, self.zeros)
                if now - beats_checked >= 0.05:
                    beats_checked = now
                    for w in self.workers:
                        if now >= w.next_beat:
                            w.heartbeat(now)
                wait = 50 if not self.due else max(0, min(50, int((self.due[0][0] - now) * 1000)))
                for sock, _ in poller.poll(wait):
                    self.drain(self.by_socket[sock])
        finally:
            for w in self.workers:
                w.sock.close(linger=0)
            self.ctx.term()

    def drain(self, w: LightWorker) -> None:
        while True:
            try:
                frames = recv_frames(w.sock, routed=False)[1]
            except zmq.Again:
                return
            msg = decode(frames, check_finite=False)
            if msg.type is MsgType.WORK:
                if self.delay:
                    heapq.heappush(
                        self.due, (time.monotonic() + self.delay, next(self.seq), w, msg)
                    )
                else:
                    w.answer(msg, self.zeros)
            elif msg.type is MsgType.ACK:
                w.updates += 1
            elif msg.type is MsgType.GRANT:
                w.granted(msg)
            elif msg.type is MsgType.WELCOME:
                w.beat = float(msg.meta["heartbeat_interval"])
            elif msg.type is MsgType.NACK and msg.meta["reason"] == "unknown_member":
                w.send(w.hello)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", default="light")
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds of pretend training per WORK"
    )
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    swarm = Swarm(args.coordinator, args.count, args.prefix, args.delay)
    swarm.run(stop)
    print(f"light workers: {swarm.updates} updates acknowledged", flush=True)


if __name__ == "__main__":
    main()
