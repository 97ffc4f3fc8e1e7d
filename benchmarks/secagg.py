"""What secure aggregation costs: FedAvg rounds under SecAgg+, elastic against plain
elastic FedAvg and against Flower's SecAgg+, in the same run.

The same job everywhere: a model of random float32 values (1M and 25M parameters),
4 and 16 clients, each doing one in-place step over every parameter per round.

* **elastic, plain**: the daemons (a coordinator and N workers over loopback TCP,
  ``--no-shared-memory``) on the ``synthetic`` task with ``fedavg``.
* **elastic, secure**: the same with ``[privacy] mechanism = "secagg"`` (clip 8, as
  Flower's default clipping range): keys, sealed shares, masked int32 inputs, the
  unmasking; the neighbours of SecAgg+'s graph (k = every other client up to 9
  clients, 12 of 16) and t = k/2 + 1.
* **Flower**: a real deployment (SuperLink and SuperNodes, flwr 1.41, its own
  virtual environment) running ``SecAggPlusWorkflow`` with ``secaggplus_mod``, with
  ``num_shares`` = k + 1 and ``reconstruction_threshold`` = t: the same graph.

Round time: the median round after a warm-up (elastic: the job's history; Flower:
its strategy's ``evaluate_fn`` after each round). Bytes: every byte through the
server's port over the whole run (the kernel's count, iptables), per round. A
Flower run that does not finish in ``--flower-timeout`` seconds is reported as
slower than that (a bound on the ratio, not a figure).

    python -m benchmarks.secagg [--sizes 1000000,25000000] [--clients 4,16] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from elastic_plugins.privacy.secagg.graph import degree_for

from benchmarks.cluster import free_port, run_job, synthetic_job
from benchmarks.flower import run_flower
from benchmarks.portbytes import PortBytes

APP = Path(__file__).parent / "flower_secagg_app"
SECURE = '[privacy]\nmechanism = "secagg"\nclip = 8.0\n'
TCP = ("--no-shared-memory",)


def counted(run, port: int):  # type: ignore[no-untyped-def]
    """``run()`` with the bytes through ``port`` counted when the kernel lets us."""
    if not PortBytes.available():
        return run(), None
    with PortBytes(port) as counter:
        result = run()
        return result, counter.total()


def elastic(params: int, clients: int, rounds: int, secure: bool) -> tuple[float, float | None]:
    """The median round (seconds) and the bytes per round of one elastic job."""
    port = free_port()
    job = synthetic_job("secagg", "fedavg", rounds, params, clients, extra=SECURE if secure else "")
    run, total = counted(
        lambda: run_job(job, clients, coordinator_args=TCP, worker_args=TCP, port=port), port
    )
    times = [r["seconds"] for r in run.rounds(1)]
    return statistics.median(times), (total / rounds if total is not None else None)


def flower(params: int, clients: int, rounds: int, timeout: float) -> tuple[float, float | None]:
    """The same for Flower's SecAgg+; (inf, None) when it did not finish in time."""
    k = degree_for(clients)
    port = free_port()
    config = {"params": params, "rounds": rounds, "num-shares": k + 1, "threshold": k // 2 + 1}
    try:
        marks, total = counted(
            lambda: run_flower(APP, config, clients, simulation=False, timeout=timeout, port=port)[
                0
            ],
            port,
        )
    except RuntimeError:
        return float("inf"), None
    times = [b - a for a, b in zip(marks, marks[1:], strict=False)][1:]
    return statistics.median(times), (total / rounds if total is not None else None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000000,25000000")
    parser.add_argument("--clients", default="4,16")
    parser.add_argument("--rounds", type=int, default=4, help="elastic's rounds, one a warm-up")
    parser.add_argument("--runs", type=int, default=5, help="elastic's runs per setting")
    parser.add_argument("--flower-runs", type=int, default=1)
    parser.add_argument("--flower-rounds", type=int, default=2)
    parser.add_argument("--flower-timeout", type=float, default=900.0)
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument(
        "--flower-sizes", default="", help="run Flower at these sizes only (default: all)"
    )
    args = parser.parse_args()
    print(
        f"FedAvg rounds: elastic plain, elastic secagg ({args.runs} runs of {args.rounds} rounds, "
        f"median round after a warm-up), Flower SecAgg+ ({args.flower_runs} run(s)); loopback"
    )
    for params in [int(s) for s in args.sizes.split(",")]:
        for clients in [int(c) for c in args.clients.split(",")]:
            ratios, plain_times, secure_times, plain_bytes, secure_bytes = [], [], [], [], []
            for _ in range(args.runs):
                plain, pb = elastic(params, clients, args.rounds, secure=False)
                secure, sb = elastic(params, clients, args.rounds, secure=True)
                ratios.append(secure / plain)
                plain_times.append(plain)
                secure_times.append(secure)
                plain_bytes += [pb] if pb else []
                secure_bytes += [sb] if sb else []
                print(
                    f"  params={params:,} clients={clients} plain {plain:.3f} s secure "
                    f"{secure:.3f} s secure/plain {secure / plain:.2f}"
                    + (
                        f" bytes/round plain {pb / 1e6:.1f} MB secure {sb / 1e6:.1f} MB"
                        if pb and sb
                        else ""
                    ),
                    flush=True,
                )
            line = (
                f"params={params:,} clients={clients}: secure/plain {_spread(ratios)}; "
                f"plain {_spread(plain_times)} s, secure {_spread(secure_times)} s"
            )
            if secure_bytes and plain_bytes:
                line += (
                    f"; MB/round plain {statistics.median(plain_bytes) / 1e6:.1f}, secure "
                    f"{statistics.median(secure_bytes) / 1e6:.1f}"
                )
            print(line, flush=True)
            if args.no_flower or (
                args.flower_sizes and str(params) not in args.flower_sizes.split(",")
            ):
                continue
            for _ in range(args.flower_runs):
                started = time.monotonic()
                fl, fb = flower(params, clients, args.flower_rounds, args.flower_timeout)
                elastic_secure = statistics.median(secure_times)
                if fl == float("inf"):
                    bound = args.flower_timeout / args.flower_rounds / elastic_secure
                    print(
                        f"  Flower SecAgg+ params={params:,} clients={clients}: did not finish "
                        f"{args.flower_rounds} rounds in {time.monotonic() - started:.0f} s: "
                        f"Flower / elastic > {bound:.0f}",
                        flush=True,
                    )
                    continue
                print(
                    f"  Flower SecAgg+ params={params:,} clients={clients}: {fl:.2f} s/round"
                    + (f", {fb / 1e6:.1f} MB/round" if fb else "")
                    + f"; Flower / elastic secure = {fl / elastic_secure:.1f}",
                    flush=True,
                )


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


if __name__ == "__main__":
    main()
