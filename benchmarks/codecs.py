"""Compression: bytes on the wire, what it costs in accuracy, and in time.

1. ``digits`` FedAvg, 4 workers, 30 rounds (``elastic.simulation``: the real engine,
   codecs and worker runtime, every message through the wire format), for each
   chain: bytes up and down as a ratio to the uncompressed run, and the accuracy.
2. Encode + decode time of each stage on one float32 tensor of ``--numel`` elements
   (a 4096 x N matrix), as a ratio to copying that tensor once, measured in the same
   run.

    python benchmarks/codecs.py [--numel 25000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.plotting import bar_chart  # noqa: E402
from elastic.jobspec import parse_job_spec  # noqa: E402
from elastic.plugins import Plugins  # noqa: E402
from elastic.simulation import simulate  # noqa: E402

CHAINS: list[tuple[list[str], list[str]]] = [  # (update, model)
    ([], []),
    (["fp16", "zstd"], []),
    (["qsgd:4", "zstd"], []),
    (["topk:0.1", "fp16", "zstd"], []),
    (["signsgd"], []),
    (["powersgd:4", "fp16"], []),
    (["qsgd:4", "zstd"], ["fp16", "zstd"]),
    (["topk:0.1", "fp16", "zstd"], ["topk:0.1", "fp16", "zstd"]),
]
STAGES = ["fp16", "bf16", "topk:0.01", "qsgd:4", "signsgd", "powersgd:4", "zstd"]


def training(update: list[str], model: list[str]) -> tuple[int, int, float]:
    spec = parse_job_spec(
        {
            "job": {
                "id": "codecs",
                "task": "digits",
                "rule": "fedavg",
                "rounds": 30,
                "min_workers": 4,
                "eval_every": 30,
            },
            "task": {"alpha": 0.5},
            "train": {"local_epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
            "compression": {"update": update, "model": model},
            "checkpoint": {"every": 1000},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        job = simulate(spec, 4, Plugins(), Path(tmp))
    return job.totals["bytes_received"], job.totals["bytes_sent"], job.history[-1]["accuracy"]


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=25_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    print("digits FedAvg, 4 workers, 30 rounds; bytes as a ratio to no compression")
    print(f"{'update chain':<28} {'model chain':<24} {'up':>7} {'down':>7} {'accuracy':>9}")
    base_up = base_down = 0
    up_ratios: dict[str, float] = {}
    for update, model in CHAINS:
        up, down, accuracy = training(update, model)
        base_up, base_down = (up, down) if not update and not model else (base_up, base_down)
        print(
            f"{' '.join(update) or '-':<28} {' '.join(model) or '-':<24} {up / base_up:>7.3f} "
            f"{down / base_down:>7.3f} {accuracy:>9.3f}",
            flush=True,
        )
        up_ratios[
            f"{' '.join(update) or 'none'} / {' '.join(model) or 'none'} (acc {accuracy:.2f})"
        ] = (up + down) / (base_up + base_down)
    bar_chart("codecs", "digits FedAvg: bytes up + down / uncompressed", up_ratios, "x")

    codecs = Plugins().codecs
    x = torch.randn(4096, args.numel // 4096)
    copy = timed(lambda: x.clone(), args.repeats)
    print(
        f"\none float32 tensor {list(x.shape)} ({x.numel() * 4 / 1e6:.0f} MB); copy "
        f"{copy * 1e3:.1f} ms; torch threads {torch.get_num_threads()}"
    )
    print(f"{'stage':<12} {'encode ms':>10} {'decode ms':>10} {'x copy':>7} {'bytes ratio':>12}")
    for spec in STAGES:
        name, _, arg = spec.partition(":")
        codec = codecs.get(name)(arg or None)
        parts = codec.encode(x)
        encode_s = timed(lambda: codec.encode(x), args.repeats)  # noqa: B023 - timed at once
        decode_s = timed(lambda: codec.decode(parts, tuple(x.shape), x.dtype), args.repeats)  # noqa: B023
        size = sum(p.numel() * p.element_size() for p in parts.values())
        print(
            f"{spec:<12} {encode_s * 1e3:>10.1f} {decode_s * 1e3:>10.1f} "
            f"{(encode_s + decode_s) / copy:>7.1f} {size / (x.numel() * 4):>12.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
