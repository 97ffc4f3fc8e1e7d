"""Scale: the ``async`` rule with 50 to 500 light workers on one machine.

A FedBuff-style job (``async``, ``buffer = 10``) on a small ``synthetic`` model (10 000
float32) is served by the coordinator daemon to N light workers
(``benchmarks/light_workers.py``: the worker's protocol, each answering its WORK
with a delta at once). Reports updates applied per second and the coordinator's CPU
per update, between its first and last commit, and how they change from 50 to 500
workers (targets: >= 2 000 updates/s at 500, roughly flat CPU per update).

    python -m benchmarks.scale [--workers 50,100,200,500] [--versions 3000]
"""

from __future__ import annotations

import argparse

from benchmarks.cluster import run_job, synthetic_job
from benchmarks.plotting import line_chart

BUFFER = 10


def job(versions: int) -> str:
    return synthetic_job(
        "scale", "async", versions, 10_000, rule_table=f"buffer = {BUFFER}\nmax_staleness = 100000"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="50,100,200,500")
    parser.add_argument(
        "--versions", type=int, default=3000, help=f"model versions per run ({BUFFER} updates each)"
    )
    args = parser.parse_args()
    print(
        f"async rule, buffer {BUFFER}, 10 000-parameter model, light workers in one process (one "
        f"poll loop); {args.versions} versions per run"
    )
    print(
        f"{'workers':>7} {'updates/s':>10} {'CPU us/update':>14} {'coordinator CPU %':>18} "
        f"{'one-core capacity/s':>20}"
    )
    ks, rates, costs = [], [], []
    for k in (int(w) for w in args.workers.split(",")):
        run = run_job(job(args.versions), workers=0, light=k, timeout=900)
        history = run.rounds()
        start, end = history[0]["at"], history[-1]["at"]
        # Those applied after the first commit (the history keeps the first and last
        # versions, but thins a long job's middle: the totals count every update).
        updates = run.status["totals"]["updates"] - history[0]["updates"]
        rate = updates / (end - start)
        cpu = run.cpu_between(start, end)
        # What one core of coordinator could apply at this cost per update: the light
        # workers share the machine's other core, and may be what limits the rate.
        print(
            f"{k:>7} {rate:>10.0f} {cpu / updates * 1e6:>14.0f} "
            f"{cpu / (end - start) * 100:>18.0f} {updates / cpu:>20.0f}",
            flush=True,
        )
        ks.append(float(k))
        rates.append(rate)
        costs.append(cpu / updates * 1e6)
    print(
        f"at {int(ks[-1])} workers: {rates[-1]:.0f} updates/s (target >= 2000); CPU per update "
        f"{costs[-1]:.0f} us against {costs[0]:.0f} us at {int(ks[0])}"
    )
    line_chart(
        "scale",
        "async rule: updates applied per second",
        "workers",
        "updates/s",
        {"updates/s": (ks, rates)},
        log_x=True,
    )


if __name__ == "__main__":
    main()
