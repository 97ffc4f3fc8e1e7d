"""The coordinator's peak memory with K = 4, 16 and 64 workers: it must stay O(model).

A FedAvg job on the ``synthetic`` task (default 10M float32 = 40 MB) is run by the
coordinator daemon with K light workers (``benchmarks/light_workers.py``: the worker's
protocol, with the trained weights echoed from the received frames; 64 real worker
daemons would each hold a torch runtime and the model). The coordinator's RSS is
sampled every 50 ms. Its baseline (Python, torch, ZeroMQ, the same job with 1 000
parameters and as many workers) is measured in the same run; the figure is
(peak - baseline) / model size, target <= 3 at K = 64: the model, the running sum,
and the parts of updates being received (updates come in 4 MiB parts, ``--upload-part``,
and the upload window, ``--upload-window``, lets 16 MiB of them in at a time). The
largest K runs again with whole updates (as before parts: one at a time), for the
ratio of what parts save and cost. It is also shown against the baseline with 4 workers,
which counts what the connections cost too.

    python -m benchmarks.memory [--params 10_000_000] [--workers 4,16,64] [--rounds 5]
"""

from __future__ import annotations

import argparse

from benchmarks.cluster import run_job, synthetic_job
from benchmarks.plotting import line_chart


def job(params: int, k: int, rounds: int) -> str:
    return synthetic_job("memory", "fedavg", rounds, params, workers=k)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--workers", default="4,16,64")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model_mb = args.params * 4 / 2**20
    print(
        f"model {model_mb:.0f} MiB ({args.params:,} float32); baselines: the same job with 1 000 "
        "parameters, with 4 and with K workers"
    )
    print(
        f"{'workers':>7} {'peak MiB':>9} {'baseline K':>11} {'/ model':>8} {'baseline 4':>11} "
        f"{'/ model':>8} {'s/round':>8}"
    )
    ks, ratios, ratios4 = [], [], []
    counts = [int(w) for w in args.workers.split(",")]
    # The baseline with K peers takes out what K connections cost whatever the model
    # (ZeroMQ pipes, member records: ~0.04 MiB a peer); the 4-peer one keeps it.
    baselines = {
        k: run_job(job(1000, k, args.rounds), workers=0, light=k).peak_rss_mb
        for k in sorted({4, *counts})
    }
    baseline4 = baselines[4]
    for k in counts:
        baseline = baselines[k]
        run = run_job(job(args.params, k, args.rounds), workers=0, light=k)
        per_round = sorted(r["seconds"] for r in run.rounds(1))[len(run.rounds(1)) // 2]
        ratio, ratio4 = (
            (run.peak_rss_mb - baseline) / model_mb,
            (run.peak_rss_mb - baseline4) / model_mb,
        )
        print(
            f"{k:>7} {run.peak_rss_mb:>9.0f} {baseline:>11.0f} {ratio:>8.2f} {baseline4:>11.0f} "
            f"{ratio4:>8.2f} {per_round:>8.3f}",
            flush=True,
        )
        ks.append(float(k))
        ratios.append(ratio)
        ratios4.append(ratio4)
    print(
        f"(peak - baseline) / model at K = {int(ks[-1])}: {ratios[-1]:.2f} against the baseline "
        f"with as many workers (target <= 3); {ratios4[-1]:.2f} against the 4-worker one"
    )
    # The same K with updates sent whole (as before parts, with the 64 MiB window of then): what
    # parts buy, and cost.
    k = counts[-1]
    whole = run_job(
        job(args.params, k, args.rounds),
        workers=0,
        light=k,
        coordinator_args=("--upload-part", "0", "--upload-window", str(64 << 20)),
    )
    whole_round = sorted(r["seconds"] for r in whole.rounds(1))[len(whole.rounds(1)) // 2]
    print(
        f"whole updates at K = {k}: peak {whole.peak_rss_mb:.0f} MiB, "
        f"{(whole.peak_rss_mb - baselines[k]) / model_mb:.2f} models, {whole_round:.3f} s/round; "
        "in parts / whole: memory above baseline "
        f"{(run.peak_rss_mb - baselines[k]) / (whole.peak_rss_mb - baselines[k]):.2f}x, s/round "
        f"{per_round / whole_round:.2f}x"
    )
    series = {
        "above the baseline with K workers": (ks, ratios),
        "above the baseline with 4 workers": (ks, ratios4),
    }
    line_chart(
        "memory",
        "coordinator memory above its baseline, in model sizes",
        "workers (K)",
        "(peak RSS - baseline) / model",
        series,
        log_x=True,
    )


if __name__ == "__main__":
    main()
