"""Federated rules side by side on one non-IID split: rounds to a target accuracy.

``digits`` split over 4 workers by a Dirichlet draw with alpha = 0.1 (most workers
hold a few classes), the same split, seed and local training for every rule, run
with ``elastic.simulation`` (the real round engine and worker runtime in one
process). Each rule's figure is also given as a ratio to FedAvg's, measured in the
same run.

    python benchmarks/fed_rules.py [--rounds 30] [--target 0.90] [--alpha 0.1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.plotting import line_chart  # noqa: E402
from elastic.jobspec import parse_job_spec  # noqa: E402
from elastic.plugins import Plugins  # noqa: E402
from elastic.simulation import simulate  # noqa: E402

# name: (rule, [rule] table, extra [train] keys)
RULES: dict[str, tuple[str, dict, dict]] = {
    "fedavg": ("fedavg", {}, {}),
    "fedprox (mu 0.01)": ("fedavg", {}, {"prox_mu": 0.01}),
    "fedadam": (
        "fedadam",
        {},
        {},
    ),  # their defaults: server_lr 0.1, beta1 0.9, beta2 0.99, tau 1e-3
    "fedyogi": ("fedyogi", {}, {}),
    "fedadagrad": ("fedadagrad", {}, {}),
}


def run(
    rule: str, rule_params: dict, train: dict, rounds: int, alpha: float, seed: int
) -> tuple[list[float], float]:
    spec = parse_job_spec(
        {
            "job": {
                "id": "rules",
                "task": "digits",
                "rule": rule,
                "rounds": rounds,
                "min_workers": 4,
                "eval_every": 1,
                "seed": seed,
            },
            "task": {"alpha": alpha},
            "train": {"local_epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9, **train},
            "rule": rule_params,
            "checkpoint": {"every": rounds},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        job = simulate(spec, 4, Plugins(), Path(tmp))
        return [h["accuracy"] for h in job.history], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(
        f"digits, 4 workers, Dirichlet alpha {args.alpha}, seed {args.seed}, {args.rounds} "
        f"rounds; rounds to accuracy >= {args.target}"
    )
    print(
        f"{'rule':<20} {'rounds':>7} {'x fedavg':>9} {'final acc':>10} {'best acc':>9} "
        f"{'seconds':>8}"
    )
    base = None
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for name, (rule, params, train) in RULES.items():
        accuracy, seconds = run(rule, params, train, args.rounds, args.alpha, args.seed)
        curves[name] = ([float(i + 1) for i in range(len(accuracy))], accuracy)
        reached = next((i + 1 for i, a in enumerate(accuracy) if a >= args.target), None)
        if name == "fedavg":
            base = reached
        ratio = f"{reached / base:.2f}" if reached and base else "-"
        print(
            f"{name:<20} {reached if reached else 'never':>7} {ratio:>9} {accuracy[-1]:>10.3f} "
            f"{max(accuracy):>9.3f} {seconds:>8.1f}",
            flush=True,
        )
    line_chart(
        "fed_rules",
        f"digits, non-IID (Dirichlet {args.alpha}): accuracy by round",
        "round",
        "accuracy",
        curves,
    )


if __name__ == "__main__":
    main()
