"""Where a SecAgg+ client's time goes: the keystream that expands its masks, and
the memory it masks into, each against the alternative, in the same run.

* **PRG**: GB/s of keystream from a 32-byte seed, ``keys.keystream`` (AES-256 in
  GCM's counter mode) against ChaCha20 and plain AES-256-CTR, through ``cryptography``.
* **Masking with many clients to a machine**: ``--clients`` processes at once, each
  quantising and masking a change of ``--params`` float32 values with its self-mask
  and ``--neighbours`` pairwise masks (``quantise.quantise``), into the change's own
  memory (``in_place``, what a worker does) against into a fresh buffer. Wall time
  from a common start to the last to finish.

    python -m benchmarks.secagg_masking [--runs 5] [--clients 16] [--params 25000000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from elastic_plugins.privacy.secagg.keys import keystream
from elastic_plugins.privacy.secagg.quantise import levels_for, quantise

BLOCK = 1 << 16


def _throughput(make, megabytes: int = 400) -> float:  # type: ignore[no-untyped-def]
    """GB/s of keystream from ``make(seed)``, a block at a time into one buffer."""
    zeros, out = memoryview(bytes(4 * BLOCK)), bytearray(4 * BLOCK)
    encryptor = make(os.urandom(32))
    blocks = megabytes * (1 << 20) // len(out)
    started = time.perf_counter()
    for _ in range(blocks):
        encryptor.update_into(zeros, out)
    return blocks * len(out) / (time.perf_counter() - started) / 1e9


PRGS = {
    "keystream (AES-256, GCM's CTR)": keystream,
    "ChaCha20": lambda s: Cipher(algorithms.ChaCha20(s, bytes(16)), mode=None).encryptor(),
    "AES-256-CTR": lambda s: Cipher(algorithms.AES256(s), modes.CTR(bytes(16))).encryptor(),
}


def _client(params: int, neighbours: int, clients: int, in_place: bool, go, done) -> None:  # type: ignore[no-untyped-def]
    change = torch.randn(params) * 0.01
    masks = [(os.urandom(32), 1 if i % 2 else -1) for i in range(neighbours + 1)]
    go.wait()
    quantise([change], 8.0, levels_for(clients), os.urandom(32), masks, in_place=in_place)
    done.put(time.perf_counter())


def _masking(params: int, neighbours: int, clients: int, in_place: bool) -> float:
    """Seconds from a common start until every client masked its change."""
    ctx = mp.get_context("fork")
    go, done = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(params, neighbours, clients, in_place, go, done))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    time.sleep(2.0 + params * clients / 2e8)  # (every change made before the start)
    started = time.perf_counter()
    go.set()
    finished = [done.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return max(finished) - started


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--neighbours", type=int, default=12)
    args = parser.parse_args()

    speeds: dict[str, list[float]] = {name: [] for name in PRGS}
    for _ in range(args.runs):
        for name, make in PRGS.items():
            speeds[name].append(_throughput(make))
    ours = speeds["keystream (AES-256, GCM's CTR)"]
    print(f"PRG, GB/s of keystream, median (min-max) of {args.runs}:")
    for name, values in speeds.items():
        ratio = [a / b for a, b in zip(ours, values, strict=True)]
        print(f"  {name}: {_spread(values)} GB/s; keystream / this {_spread(ratio)}")

    fresh, own = [], []
    for _ in range(args.runs):
        fresh.append(_masking(args.params, args.neighbours, args.clients, in_place=False))
        own.append(_masking(args.params, args.neighbours, args.clients, in_place=True))
        print(f"  run: fresh buffer {fresh[-1]:.2f} s, in place {own[-1]:.2f} s", flush=True)
    print(
        f"{args.clients} clients at once, {args.params:,} parameters, "
        f"{args.neighbours} neighbours + self-mask: fresh buffer {_spread(fresh)} s, "
        f"in place {_spread(own)} s; fresh / in place "
        f"{_spread([a / b for a, b in zip(fresh, own, strict=True)])}"
    )


if __name__ == "__main__":
    main()
