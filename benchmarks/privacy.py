"""What differential privacy costs: ``digits`` accuracy at ε = 1, 3 and 8 (δ = 1e-5)
beside the same job without privacy, run after run.

Each of ``--clients`` clients holds one or two of the digits' training images (user-
level privacy is then nearly example-level: the hardest case, a small dataset).
Every round asks every client (no sampling to amplify: with so few clients, the
noise over the sum is what counts, and it falls as 1 / clients), one local step of
``--lr`` on its images; the coordinator clips each update to norm 1, adds the noise
and steps FedAvg with server momentum 0.9. The noise multiplier z for each ε is
calibrated by ``dp-accounting`` (RDP) for the job's rounds, exactly as a job with
``target_epsilon`` does; the accountant's ε at the end is printed beside it.

Each run (a seed: the model's start, the split) measures every setting, so each
ratio (accuracy with DP over without) is of one run. The real round engine and
worker runtime run in one process (``elastic.simulation``).

    python -m benchmarks.privacy [--runs 5] [--clients 1000] [--rounds 12]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from elastic.jobspec import parse_job_spec  # noqa: E402
from elastic.plugins import Plugins  # noqa: E402
from elastic.simulation import simulate  # noqa: E402

DELTA = 1e-5


def run(epsilon: float | None, clients: int, rounds: int, lr: float, seed: int) -> dict:
    """One job: its final accuracy, noise multiplier and ε spent."""
    privacy = (
        {"privacy": {"clip": 1.0, "target_epsilon": epsilon, "delta": DELTA}}
        if epsilon is not None
        else {}
    )
    spec = parse_job_spec(
        {
            "job": {
                "id": "privacy",
                "task": "digits",
                "rule": "fedavg",
                "rounds": rounds,
                "min_workers": 1,
                "clients": clients,
                "clients_per_round": clients,
                "eval_every": rounds,
                "seed": seed,
            },
            "task": {"partition": "iid", "hidden": 16},
            "train": {"local_epochs": 1, "batch_size": 0, "lr": lr},
            "rule": {"server_momentum": 0.9},
            **privacy,
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        job = simulate(spec, 2, Plugins(), Path(tmp))
        last = job.history[-1]
        return {
            "accuracy": float(last["accuracy"]),
            "z": last.get("noise_multiplier"),
            "epsilon": last.get("epsilon"),
            "seconds": time.perf_counter() - started,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    settings: list[float | None] = [None, *args.epsilons]
    print(
        f"digits, {args.clients} clients, all in every round, {args.rounds} rounds, clip 1, "
        f"delta {DELTA}; {args.runs} runs"
    )
    print(f"{'run':>3} {'epsilon':>8} {'z':>8} {'eps spent':>10} {'accuracy':>9} {'x no DP':>8}")
    ratios: dict[float, list[float]] = {e: [] for e in args.epsilons}
    accuracy: dict[float | None, list[float]] = {e: [] for e in settings}
    noise: dict[float, float] = {}
    for seed in range(args.runs):
        plain = None
        for epsilon in settings:
            got = run(epsilon, args.clients, args.rounds, args.lr, seed)
            accuracy[epsilon].append(got["accuracy"])
            if epsilon is None:
                plain = got["accuracy"]
                ratio = "-"
            else:
                assert plain is not None
                ratios[epsilon].append(got["accuracy"] / plain)
                noise[epsilon] = got["z"]
                ratio = f"{got['accuracy'] / plain:.3f}"
            print(
                f"{seed:>3} {epsilon if epsilon is not None else 'none':>8} "
                f"{got['z'] if got['z'] is not None else '-':>8} "
                f"{got['epsilon'] if got['epsilon'] is not None else '-':>10} "
                f"{got['accuracy']:>9.3f} {ratio:>8}",
                flush=True,
            )
    print("\nmedian (min-max) over the runs")
    print(f"{'epsilon':>8} {'z':>8} {'accuracy':>22} {'x no DP':>22}")
    for epsilon in settings:
        acc = accuracy[epsilon]
        line = f"{epsilon if epsilon is not None else 'none':>8} "
        line += f"{noise.get(epsilon, '-') if epsilon is not None else '-':>8} "
        line += f"{_spread(acc):>22} "
        line += f"{_spread(ratios[epsilon]) if epsilon is not None else '-':>22}"
        print(line)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


if __name__ == "__main__":
    main()
