"""A transparent TCP relay that adds latency: ``tc netem delay`` for a kernel
without the netem qdisc (this one has none).

Run it inside a host's namespace, and send that host's outgoing TCP to it::

    iptables -t nat -A OUTPUT -p tcp -d SUBNET -m mark ! --mark MARK -j REDIRECT --to-ports PORT

Each redirected connection is accepted here and continued to its original
destination (``SO_ORIGINAL_DST``) from a socket carrying ``MARK``, so it is not
redirected again. Bytes leaving the host are handed on ``--delay`` seconds after
they were read, like netem on the host's egress; bandwidth is kept. Loss is the
kernel's business (iptables ``statistic``), and TCP's retransmissions handle it.

    python -m tests.chaos.delay_relay --port 15000 --delay 0.2 --mark 7
"""

from __future__ import annotations

import argparse
import collections
import socket
import struct
import threading
import time

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
CHUNK = 1 << 16


def original_destination(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class DelayedPipe:
    """Copies ``src`` to ``dst``, each chunk ``delay`` seconds after it was read."""

    def __init__(
        self, src: socket.socket, dst: socket.socket, delay: float, changed: threading.Event
    ) -> None:
        self.src, self.dst, self.delay, self.changed = src, dst, delay, changed
        self.finished = self.failed = False
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.src.recv(CHUNK)
            except OSError:
                data = b""
            with self.ready:
                self.queue.append((time.monotonic() + self.delay, data))
                self.ready.notify()
            if not data:
                return

    def _write(self) -> None:
        while True:
            with self.ready:
                while not self.queue:
                    self.ready.wait()
                due, data = self.queue.popleft()
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                if not data:  # the sender finished: pass the half-close on
                    self.dst.shutdown(socket.SHUT_WR)
                    self.finished = True
                else:
                    self.dst.sendall(data)
            except OSError:
                self.finished = self.failed = True
            if self.finished:
                self.changed.set()
                return


def relay(conn: socket.socket, delay_up: float, delay_down: float, mark: int) -> None:
    try:
        host, port = original_destination(conn)
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        upstream.settimeout(10)
        upstream.connect((host, port))
        upstream.settimeout(None)
    except OSError:
        conn.close()
        return
    for s in (conn, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    changed = threading.Event()
    pipes = (
        DelayedPipe(conn, upstream, delay_up, changed),
        DelayedPipe(upstream, conn, delay_down, changed),
    )
    # Until both directions ended, or one failed (its peer is gone: drop both).
    while not all(p.finished for p in pipes) and not any(p.failed for p in pipes):
        changed.wait()
        changed.clear()
    for s in (conn, upstream):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--delay", type=float, default=0.2, help="seconds added to bytes leaving this host"
    )
    parser.add_argument(
        "--delay-in", type=float, default=0.0, help="seconds added to bytes arriving"
    )
    parser.add_argument("--mark", type=int, default=7)
    args = parser.parse_args()
    server = socket.create_server(("0.0.0.0", args.port), backlog=64)
    print(
        f"delay relay listening port={args.port} delay={args.delay} delay_in={args.delay_in}",
        flush=True,
    )
    while True:
        conn, _ = server.accept()
        threading.Thread(
            target=relay, args=(conn, args.delay, args.delay_in, args.mark), daemon=True
        ).start()


if __name__ == "__main__":
    main()
