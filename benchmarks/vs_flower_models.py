"""elastic against Flower on real models, in the same run, with the same clients' data,
initial weights, hyper-parameters and local loop (each client's batches shuffled by the
seed elastic's worker uses for it; the Flower side, ``benchmarks/flower_torch_app``,
writes that loop again, Flower's own ``FedAvg`` aggregates).

``parity``: FedAvg on ``digits`` split non-IID (Dirichlet 0.5) among 4 clients, all in
every round, 30 rounds: the test accuracy after each round in Flower (its simulation
engine) and in elastic (daemons: a coordinator and 2 workers serving the 4 clients as
virtual clients). Target: within 1 point at every round.

``clients``: 1 000 clients, 20 a round, the ``digits`` MLP, one local epoch: rounds per
minute in elastic (daemons, 2 worker processes) and in Flower's simulation engine
(1 000 simulated SuperNodes, one CPU each, on Ray), and each one's peak memory (every
process of the run). Target: elastic >= 5x Flower's rounds per minute.

``resnet``: the ``images`` task's ResNet-18 (11.2 M parameters) on generated 32x32
images, one local epoch of ``--batches`` batches of 32 on each client, 2 and 4 clients:
the median round time in a Flower deployment (SuperLink + SuperNodes on loopback) and
in elastic (daemons, TCP), each one's overhead (round time minus its slowest client's
own training time, measured inside the client), and the test accuracy after the same
rounds. Targets: elastic's overhead <= 1/10 of Flower's, its round time below Flower's,
accuracy within 1 point.

    python -m benchmarks.vs_flower_models parity
    python -m benchmarks.vs_flower_models clients [--rounds 21]
    python -m benchmarks.vs_flower_models resnet [--workers 2,4] [--rounds 4] [--batches 4]
    python -m benchmarks.vs_flower_models resnet --rounds 8 --classes 4 --lr 0.02 --momentum 0.9 \
        --per-round-accuracy   # accuracy after the same rounds, trained to convergence
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.cluster import run_job
from benchmarks.flower import run_flower
from elastic.plugins import Plugins
from elastic.tasks import Shard

APP = Path(__file__).parent / "flower_torch_app"
RESNET_FILE = Path(__file__).resolve().parents[1] / "plugins" / "tasks" / "resnet.py"


def prepare(
    path: Path, task: str, params: dict[str, Any], clients: int, seed: int, model: tuple
) -> None:
    """What the Flower side needs, from elastic's own task: every client's data (the
    shard elastic's worker trains that client on), the test set, the initial weights."""
    built = Plugins().task(task)(params)
    xs, ys = [], []
    for client in range(clients):
        x, y = built.train_dataset(Shard(client, clients, seed), None).tensors
        xs.append(x.contiguous())
        ys.append(y.contiguous())
    x_test, y_test = built.test_dataset(None).tensors
    torch.save(
        {
            "model": model,
            "init": built.build_model(seed).state_dict(),
            "x": xs,
            "y": ys,
            "x_test": x_test,
            "y_test": y_test,
        },
        path,
    )


def job_toml(
    job: str, task: str, task_table: str, rounds: int, clients: int, per_round: int, train: str
) -> str:
    return (
        f'[job]\nid = "{job}"\ntask = "{task}"\nrule = "fedavg"\nrounds = {rounds}\n'
        f"min_workers = 2\nclients = {clients}\nclients_per_round = {per_round}\n"
        f"eval_every = 1\n[task]\n{task_table}\n[train]\n{train}\n"
        "[checkpoint]\nevery = 1000\n"
    )


def per_minute(ats: list[float]) -> float:
    """Rounds a minute between the first and the last of these end-of-round times."""
    return 60 * (len(ats) - 1) / (ats[-1] - ats[0])


# ------------------------------------------------------------------ parity --


def parity(args: argparse.Namespace) -> None:
    rounds, clients, seed = 30, 4, 0
    train = {"local-epochs": 2, "batch-size": 32, "lr": 0.05, "momentum": 0.9}
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        data = Path(tmp) / "digits.pt"
        prepare(
            data,
            "digits",
            {"alpha": 0.5},
            clients,
            seed,
            ("mlp", {"inputs": 64, "hidden": 64, "classes": 10}),
        )
        flower, _ = run_flower(
            APP,
            {
                "data-file": str(data),
                "rounds": rounds,
                "per-round": clients,
                "seed": seed,
                "evaluate": 1,
                **train,
            },
            clients,
            simulation=True,
        )
    elastic = run_job(
        job_toml(
            "parity",
            "digits",
            "alpha = 0.5",
            rounds,
            clients,
            clients,
            "local_epochs = 2\nbatch_size = 32\nlr = 0.05\nmomentum = 0.9",
        ),
        2,
    ).status["history"]
    ours = [h["accuracy"] for h in elastic]
    theirs = flower["accuracy"]
    gaps = [abs(a - b) * 100 for a, b in zip(ours, theirs, strict=True)]
    print("FedAvg on digits, Dirichlet 0.5 over 4 clients, 30 rounds: test accuracy per round")
    print(f"{'round':>5} {'elastic':>8} {'Flower':>8} {'gap (points)':>13}")
    for r, (a, b, g) in enumerate(zip(ours, theirs, gaps, strict=True), 1):
        print(f"{r:>5} {a:>8.4f} {b:>8.4f} {g:>13.2f}")
    print(f"largest gap: {max(gaps):.2f} points (target <= 1)")


# ----------------------------------------------------------------- clients --


def many_clients(args: argparse.Namespace) -> None:
    clients, per_round, seed, rounds = 1000, 20, 0, args.rounds
    with tempfile.TemporaryDirectory(prefix="clients-") as tmp:
        data = Path(tmp) / "digits.pt"
        prepare(
            data,
            "digits",
            {"partition": "iid"},
            clients,
            seed,
            ("mlp", {"inputs": 64, "hidden": 64, "classes": 10}),
        )
        for sitting in range(args.runs):
            flower, flower_mb = run_flower(
                APP,
                {
                    "data-file": str(data),
                    "rounds": rounds,
                    "per-round": per_round,
                    "seed": seed,
                    "evaluate": 0,
                    "local-epochs": 1,
                    "batch-size": 32,
                    "lr": 0.05,
                    "momentum": 0.0,
                },
                clients,
                simulation=True,
            )
            run = run_job(
                job_toml(
                    "clients",
                    "digits",
                    'partition = "iid"',
                    rounds,
                    clients,
                    per_round,
                    "local_epochs = 1\nbatch_size = 32\nlr = 0.05",
                ).replace("eval_every = 1", "eval_every = 0"),
                2,
            )
            ours = per_minute([h["at"] for h in run.status["history"]][1:])  # after round 1
            theirs = per_minute(flower["marks"][2:])  # marks: before round 1, after each
            print(
                f"run {sitting + 1}: 1000 clients, 20 a round: elastic {ours:.0f} rounds/min "
                f"(peak {run.peak_total_rss_mb:.0f} MB), Flower simulation {theirs:.0f} "
                f"rounds/min (peak {flower_mb:.0f} MB): elastic / Flower = {ours / theirs:.1f}",
                flush=True,
            )


# ------------------------------------------------------------------ resnet --


def separable_images(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """32x32 RGB images: class k is a patch of its own colour, anywhere, over noise."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (classes, 3))
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 100, (n, 32, 32, 3)).astype(np.uint8)
    for i, k in enumerate(y):
        row, col = rng.integers(0, 22, 2)
        x[i, row : row + 10, col : col + 10] = colours[k]
    return x, y


def resnet(args: argparse.Namespace) -> None:
    seed, classes, width = 0, args.classes, 64
    print(
        f"ResNet-18 (width {width}, 11.2M parameters), one epoch of {args.batches} batches of 32 "
        f"a client, median of {args.rounds - 1} rounds after a warm-up"
    )
    print(
        f"{'clients':>7} {'Flower s':>9} {'elastic s':>10} {'Flower overhead':>16} "
        f"{'elastic overhead':>17} {'ratio':>6} {'acc Flower':>11} {'acc elastic':>12}"
    )
    for workers in [int(w) for w in args.workers.split(",")]:
        with tempfile.TemporaryDirectory(prefix="resnet-") as tmp:
            images = Path(tmp) / "images.npz"
            per_client = 32 * args.batches
            x, y = separable_images(per_client * workers * 5 // 4, classes, seed)
            np.savez(images, x=x, y=y)
            params = {"path": str(images), "classes": classes, "width": width}
            data = Path(tmp) / "resnet.pt"
            model = (
                "resnet",
                {
                    "file": str(RESNET_FILE),
                    "args": {"classes": classes, "channels": 3, "width": width},
                },
            )
            prepare(data, "images", params, workers, seed, model)
            flower, _ = run_flower(
                APP,
                {
                    "data-file": str(data),
                    "rounds": args.rounds,
                    "per-round": workers,
                    "seed": seed,
                    "evaluate": 1,
                    "local-epochs": 1,
                    "batch-size": 32,
                    "lr": args.lr,
                    "momentum": args.momentum,
                },
                workers,
                simulation=False,
            )
            table = f'path = "{images}"\nclasses = {classes}\nwidth = {width}'
            tcp = ("--no-shared-memory",)
            run = run_job(
                job_toml(
                    "resnet",
                    "images",
                    table,
                    args.rounds,
                    workers,
                    workers,
                    f"local_epochs = 1\nbatch_size = 32\nlr = {args.lr}\n"
                    f"momentum = {args.momentum}",
                ),
                workers,
                coordinator_args=tcp,
                worker_args=tcp,
            )
        history = run.status["history"][1:]
        f_rounds = [b - a for a, b in zip(flower["marks"][1:], flower["marks"][2:], strict=False)]
        f_train = flower["train_seconds_max"][1:]
        e_round = statistics.median(h["seconds"] for h in history)
        f_round = statistics.median(f_rounds)
        e_over = statistics.median(h["seconds"] - h["train_seconds_max"] for h in history)
        f_over = statistics.median(r - t for r, t in zip(f_rounds, f_train, strict=False))
        print(
            f"{workers:>7} {f_round:>9.2f} {e_round:>10.2f} {f_over:>16.3f} {e_over:>17.3f} "
            f"{f_over / e_over:>6.1f} {flower['accuracy'][-1]:>11.4f} "
            f"{run.status['history'][-1]['accuracy']:>12.4f}",
            flush=True,
        )
        if args.per_round_accuracy:
            ours = [round(h["accuracy"], 4) for h in run.status["history"]]
            theirs = [round(a, 4) for a in flower["accuracy"]]
            print(f"  accuracy per round: Flower {theirs}, elastic {ours}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["parity", "clients", "resnet"])
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default: per benchmark)")
    parser.add_argument("--runs", type=int, default=1, help="runs of the clients benchmark")
    parser.add_argument("--workers", default="2,4", help="resnet: client counts")
    parser.add_argument("--batches", type=int, default=4, help="resnet: batches a client")
    parser.add_argument("--lr", type=float, default=0.05, help="resnet: the clients' SGD lr")
    parser.add_argument("--classes", type=int, default=10, help="resnet: classes in the images")
    parser.add_argument("--momentum", type=float, default=0.0, help="resnet: SGD momentum")
    parser.add_argument(
        "--per-round-accuracy", action="store_true", help="resnet: print each round's accuracy"
    )
    args = parser.parse_args()
    if args.what == "parity":
        parity(args)
    elif args.what == "clients":
        args.rounds = args.rounds or 21
        many_clients(args)
    else:
        args.rounds = args.rounds or 4
        resnet(args)


if __name__ == "__main__":
    main()
