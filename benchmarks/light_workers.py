"""Light workers: many protocol-faithful workers in one process, for load.

Each is a thread with its own DEALER socket and identity that speaks the worker's
side of the protocol: HELLO, heartbeats, and for every WORK an UPDATE computed
against the version it was given (big ones OFFERed first and sent when GRANTed). Its
"training" returns the received weights as they are, from the received frames, so a
few hundred of them fit on one machine and what is measured is the coordinator.
Real workers (``elastic worker``) each hold a torch runtime and a model; 64 of them
at 100 MB would not fit here.

    python -m benchmarks.light_workers --coordinator tcp://127.0.0.1:5555 --count 64
"""

from __future__ import annotations

import argparse
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
from elastic.wire.transport import dealer_socket, recv_frames, send_message


class LightWorker(threading.Thread):
    def __init__(self, ctx: zmq.Context, address: str, wid: str, stop: threading.Event, delay: float = 0.0) -> None:
        super().__init__(daemon=True, name=wid)
        self.ctx, self.address, self.wid, self.stop, self.delay = ctx, address, wid, stop, delay
        self.updates = 0
        self.held: dict[str, Message] = {}

    def send(self, sock: zmq.Socket, msg: Message) -> None:
        msg.sender = self.wid
        send_message(sock, msg)

    def run(self) -> None:
        sock = dealer_socket(self.ctx, self.wid, self.address)
        hello = Message(MsgType.HELLO, meta={"device": "cpu (light)", "host": socket.gethostname(), "software": __version__, "pid": os.getpid()})
        self.send(sock, hello)
        beat, next_beat = 1.0, 0.0
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    self.send(sock, Message(MsgType.HEARTBEAT, meta={"busy": False}))
                    next_beat = now + beat
                if not sock.poll(100):
                    continue
                msg = decode(recv_frames(sock, routed=False)[1], check_finite=False)
                if msg.type is MsgType.WELCOME:
                    beat = float(msg.meta["heartbeat_interval"])
                elif msg.type is MsgType.WORK:
                    self.answer(sock, msg)
                elif msg.type is MsgType.GRANT and msg.key in self.held:
                    self.send(sock, self.held.pop(msg.key))
                elif msg.type is MsgType.NACK and msg.meta["reason"] == "unknown_member":
                    self.send(sock, hello)
                elif msg.type is MsgType.ACK:
                    self.updates += 1
        finally:
            sock.close(linger=0)

    def answer(self, sock: zmq.Socket, work: Message) -> None:
        if self.delay:
            time.sleep(self.delay)  # "training"
        mode = work.meta["mode"]
        if mode == "train":  # the trained weights: the received ones, from the received frames
            tensors, kind = work.tensors, "weights"
        else:  # a delta or a gradient of zeros (small models: this allocates)
            tensors = {k: WireTensor.from_tensor(torch.zeros_like(t.to_tensor())) for k, t in work.tensors.items()}
            kind = "delta" if mode == "delta" else "gradient"
        update = Message(
            MsgType.UPDATE, job=work.job, round=work.round, version=work.version, key=work.key,
            meta={"num_samples": 8, "loss": 0.5, "kind": kind, "train_seconds": self.delay}, tensors=tensors,
        )
        if update.payload_bytes >= OFFER_MIN_BYTES:
            self.held = {update.key: update}  # only the newest is worth sending
            self.send(sock, Message(MsgType.OFFER, job=work.job, round=work.round, version=work.version, key=update.key, meta={"bytes": update.payload_bytes}))
        else:
            self.send(sock, update)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", default="light")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds of pretend training per WORK")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ctx = zmq.Context()
    workers = [LightWorker(ctx, args.coordinator, f"{args.prefix}{i}", stop, args.delay) for i in range(args.count)]
    for w in workers:
        w.start()
    try:
        while not stop.is_set():
            stop.wait(0.5)
    except KeyboardInterrupt:
        stop.set()
    for w in workers:
        w.join(5)
    print(f"light workers: {sum(w.updates for w in workers)} updates acknowledged", flush=True)
    ctx.term()


if __name__ == "__main__":
    main()
