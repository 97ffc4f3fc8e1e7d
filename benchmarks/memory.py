"""The coordinator's peak memory with K = 4, 16 and 64 workers: it must stay O(model).

A FedAvg job on the ``synthetic`` task (default 10M float32 = 40 MB) is run by the
coordinator daemon with K light workers (``benchmarks/light_workers.py``: the worker's
protocol, with the trained weights echoed from the received frames; 64 real worker
daemons would each hold a torch runtime and the model). The coordinator's RSS is
sampled every 50 ms. Its baseline (Python, torch, ZeroMQ, a job of 1 000 parameters)
is measured in the same run; the figure is (peak - baseline) / model size, target
<= 3 at K = 64: the model, the running sum, and the one update being received (the
upload window, ``--upload-window``, lets one big update in at a time).

    python -m benchmarks.memory [--params 10_000_000] [--workers 4,16,64] [--rounds 5]
"""

from __future__ import annotations

import argparse

from benchmarks.cluster import run_job, synthetic_job
from benchmarks.plotting import line_chart


def job(params: int, k: int, rounds: int) -> str:
    return synthetic_job("memory", "fedavg", rounds, params, workers=k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--workers", default="4,16,64")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model_mb = args.params * 4 / 2**20
    baseline = run_job(job(1000, 4, args.rounds), workers=0, light=4).peak_rss_mb
    print(f"model {model_mb:.0f} MiB ({args.params:,} float32); coordinator baseline (a 1 000-parameter job) {baseline:.0f} MiB")
    print(f"{'workers':>7} {'peak MiB':>9} {'above baseline':>15} {'/ model':>8} {'s/round':>8}")
    ks, ratios = [], []
    for k in (int(w) for w in args.workers.split(",")):
        run = run_job(job(args.params, k, args.rounds), workers=0, light=k)
        above = run.peak_rss_mb - baseline
        per_round = sorted(r["seconds"] for r in run.rounds(1))[len(run.rounds(1)) // 2]
        print(f"{k:>7} {run.peak_rss_mb:>9.0f} {above:>15.0f} {above / model_mb:>8.2f} {per_round:>8.3f}", flush=True)
        ks.append(float(k))
        ratios.append(above / model_mb)
    print(f"(peak - baseline) / model at K = {int(ks[-1])}: {ratios[-1]:.2f} (target <= 3)")
    line_chart("memory", "coordinator memory above its baseline, in model sizes", "workers (K)", "(peak RSS - baseline) / model", {"elastic": (ks, ratios)}, log_x=True)


if __name__ == "__main__":
    main()
