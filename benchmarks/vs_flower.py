"""FedAvg rounds, elastic against Flower, on the same machine in the same run.

The same job on both: a model of random float32 values (25M and 1K parameters),
2 and 4 workers, each doing one in-place step over every parameter per round, and
FedAvg weighted by examples.

* **Flower**: a real deployment on loopback (flwr 1.41): ``flower-superlink`` and one
  ``flower-supernode`` per worker, the app in ``benchmarks/flower_app`` submitted with
  ``flwr run``; Flower's own ``FedAvg`` strategy. Round times come from the ServerApp
  (Flower calls ``evaluate_fn`` after every round). Flower runs in its own virtual
  environment (``.venv-flower``, made on first use), so its pins (grpcio, protobuf)
  never touch elastic's.
* **elastic**: the daemons (a coordinator and N workers, plaintext like Flower's
  ``--insecure``) on the ``synthetic`` task with the ``fedavg`` rule; round times from
  the job's history. Tensors go over loopback TCP (``--no-shared-memory``) as
  Flower's go over gRPC: the comparison is the networked path, what workers on other
  hosts get (workers on the coordinator's host would be faster still).

The first round of each is a warm-up and not counted. Prints medians and the ratio
Flower / elastic (targets: >= 30 at 25M, >= 300 at 1K).

    python -m benchmarks.vs_flower [--sizes 25000000,1000] [--workers 2,4] [--rounds 4]
    python -m benchmarks.vs_flower --elastic-only --rounds 9   # elastic's rounds alone
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.cluster import run_job, synthetic_job
from benchmarks.flower import FLWR, run_flower
from benchmarks.plotting import bar_chart

APP = Path(__file__).parent / "flower_app"


def flower_round_times(params: int, nodes: int, rounds: int) -> list[float]:
    marks, _ = run_flower(
        APP,
        {"params": params, "rounds": rounds},
        nodes,
        simulation=False,
        timeout=120 + rounds * (30 + params / 1e6),
    )
    return [b - a for a, b in zip(marks, marks[1:], strict=False)][
        1:
    ]  # marks: before round 1, after each; round 1 warms up


def elastic_round_times(params: int, workers: int, rounds: int) -> list[float]:
    tcp = ("--no-shared-memory",)
    return [
        r["seconds"]
        for r in run_job(
            synthetic_job("vs-flower", "fedavg", rounds, params, workers),
            workers,
            coordinator_args=tcp,
            worker_args=tcp,
        ).rounds(1)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="25000000,1000", help="parameter counts, comma-separated"
    )
    parser.add_argument("--workers", default="2,4", help="worker counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run, the first a warm-up")
    parser.add_argument(
        "--elastic-only",
        action="store_true",
        help="elastic's side alone (to compare two commits of elastic): no Flower",
    )
    args = parser.parse_args()
    if args.elastic_only:
        for params in [int(s) for s in args.sizes.split(",")]:
            for workers in [int(w) for w in args.workers.split(",")]:
                times = elastic_round_times(params, workers, args.rounds)
                print(
                    f"elastic FedAvg params={params} workers={workers} "
                    f"median={statistics.median(times):.4f} s/round ({len(times)} rounds)",
                    flush=True,
                )
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(w) for w in args.workers.split(",")]
    print(
        f"FedAvg, median round of {args.rounds - 1} after a warm-up; Flower {FLWR.split('==')[1]} "
        "deployment (SuperLink + SuperNodes) vs elastic daemons, loopback"
    )
    print(
        f"{'params':>11} {'workers':>7} {'Flower s':>9} {'elastic s':>10} {'Flower / elastic':>17}"
    )
    bars = {}
    for params in sizes:
        for workers in counts:
            flower = statistics.median(flower_round_times(params, workers, args.rounds))
            elastic = statistics.median(elastic_round_times(params, workers, args.rounds))
            print(
                f"{params:>11,} {workers:>7} {flower:>9.3f} {elastic:>10.4f} "
                f"{flower / elastic:>17.1f}",
                flush=True,
            )
            bars[f"{params:,} params, {workers} workers"] = flower / elastic
    bar_chart("vs_flower", "FedAvg round time, Flower / elastic (same run)", bars, "x", log_x=True)


if __name__ == "__main__":
    main()
