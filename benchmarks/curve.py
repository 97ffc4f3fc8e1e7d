"""What CURVE costs: the round trip of a large message over loopback TCP with and
without encryption, measured in the same run.

Two processes, a ROUTER and a DEALER, as the coordinator and a worker have; the
message goes out and comes back whole in 1 MiB frames (the daemons' frame size),
once with plaintext sockets and once with CURVE (a key pair each, the server
checking the client's key through ZAP, as ``elastic.security`` sets it up).

    python benchmarks/curve.py [--mb 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.plotting import bar_chart  # noqa: E402
from elastic.security import DATA, CurveServer, client_security, generate  # noqa: E402

FRAME = 1 << 20


def echo(endpoint: str, keys: str | None, ready: mp.Event) -> None:  # type: ignore[valid-type]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    if keys:
        client_security(f"{keys}/client.key_secret", f"{keys}/server.key")(sock)
    sock.connect(endpoint)
    sock.send(b"ready")  # tells the ROUTER who we are (after the CURVE handshake)
    ready.set()  # type: ignore[attr-defined]
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 1 and frames[0].bytes == b"stop":
            break
        sock.send_multipart(frames, copy=False)
    sock.close(linger=0)
    ctx.term()


def measure(keys: str | None, mb: int, repeats: int) -> list[float]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    server = None
    if keys:
        server = CurveServer(ctx, f"{keys}/server.key_secret", {DATA: f"{keys}/allowed"})
        server.apply(sock, DATA)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    ready = mp.get_context("spawn").Event()
    peer = mp.get_context("spawn").Process(
        target=echo, args=(f"tcp://127.0.0.1:{port}", keys, ready)
    )
    peer.start()
    ready.wait(30)
    payload = [memoryview(bytearray(FRAME)) for _ in range(mb)]
    times = []
    try:
        peer_id = sock.recv_multipart()[0]  # the peer's "ready"
        for _ in range(repeats + 1):
            started = time.perf_counter()
            sock.send_multipart([peer_id, *payload], copy=False)
            sock.recv_multipart(copy=False)
            times.append(time.perf_counter() - started)
        sock.send_multipart([peer_id, b"stop"])
    finally:
        peer.join(30)
        sock.close(linger=0)
        if server is not None:
            server.stop()
        ctx.term()
    return times[1:]  # the first one warms up


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), "server")
        generate(Path(tmp) / "allowed", "client")
        (Path(tmp) / "client.key_secret").write_bytes(
            (Path(tmp) / "allowed" / "client.key_secret").read_bytes()
        )
        (Path(tmp) / "allowed" / "client.key_secret").unlink()
        plain = measure(None, args.mb, args.repeats)
        curve = measure(tmp, args.mb, args.repeats)
    moved = 2 * args.mb * FRAME / 1e9
    p, c = statistics.median(plain), statistics.median(curve)
    print(f"{args.mb} MiB each way in 1 MiB frames, loopback TCP; median of {args.repeats}")
    print(f"{'mode':<10} {'round trip ms':>14} {'GB/s':>6}")
    print(f"{'plaintext':<10} {p * 1e3:>14.1f} {moved / p:>6.2f}")
    print(f"{'curve':<10} {c * 1e3:>14.1f} {moved / c:>6.2f}")
    print(f"curve / plaintext = {c / p:.2f} (the cost of encryption and authentication)")
    bar_chart(
        "curve",
        f"{args.mb} MiB each way, loopback TCP: GB/s moved",
        {"plaintext": moved / p, "curve": moved / c},
        "GB/s",
    )


if __name__ == "__main__":
    main()
