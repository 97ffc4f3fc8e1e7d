"""Asynchronous vs synchronous aggregation with a straggler: wall-clock time to a
target accuracy on ``digits``, both measured in this run on the same machine.

Four workers, one of them 5x slower (a SIGSTOP/SIGCONT duty cycle: it runs a fifth
of the time, as if on a slower machine). The same local work per update for both:
one epoch of SGD on its quarter of the data.

* ``fedavg``  every round waits for all four, so each round takes the straggler's time;
* ``async``   (buffer 1, polynomial staleness, max_staleness 3) never waits: the fast
              workers keep making versions and the straggler's stale updates are refused.

The clock starts when the job first hands out work (all four workers joined) and
stops at the commit whose evaluation first reaches the target. Prints each run, the
medians and the ratio fedavg / async (target: >= 2).

    python benchmarks/async_vs_sync.py [--repeats 3] [--target 0.90] [--slowdown 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.plotting import bar_chart  # noqa: E402
from tests.etcd_server import free_port  # noqa: E402
from tests.throttle import Throttle  # noqa: E402

COMMON = """
[job]
id = "bench"
task = "digits"
rule = "{rule}"
rounds = {rounds}
min_workers = 4
partitions = 4
round_timeout = 120
eval_every = {eval_every}
seed = {seed}
[task]
alpha = 100.0
[train]
local_epochs = 1
batch_size = 32
lr = 0.05
momentum = 0.9
[rule]
{rule_params}
[checkpoint]
every = 1000
"""
MODES = {
    "fedavg": {"rounds": 60, "eval_every": 1, "rule_params": ""},
    "async": {
        "rounds": 600,
        "eval_every": 2,
        "rule_params": 'buffer = 1\nmixing = 0.3\nmax_staleness = 3\nstaleness = "polynomial"',
    },
}


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def time_to_accuracy(
    mode: str, target: float, slowdown: float, seed: int, timeout: float
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        job = root / "job.toml"
        job.write_text(COMMON.format(rule=mode, seed=seed, **MODES[mode]))
        address = f"tcp://127.0.0.1:{free_port()}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", ELASTIC_INSECURE="1")  # loopback only
        procs: list[subprocess.Popen] = []

        def spawn(name: str, *args: str) -> subprocess.Popen:
            with open(root / f"{name}.log", "ab") as out:
                p = subprocess.Popen(
                    [sys.executable, "-m", "elastic", *args],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            procs.append(p)
            return p

        try:
            spawn(
                "coordinator",
                "coordinator",
                "--bind",
                address,
                "--control",
                f"tcp://127.0.0.1:{free_port()}",
                "--state-dir",
                str(root / "state"),
                "--job",
                str(job),
            )
            workers = [
                spawn(
                    w,
                    "worker",
                    "--coordinator",
                    address,
                    "--id",
                    w,
                    "--device",
                    "cpu",
                    "--threads",
                    "1",
                )
                for w in ("slow", "w1", "w2", "w3")
            ]
            status_file = root / "state" / "bench" / "status.json"
            deadline = time.monotonic() + timeout
            while (s := read_status(status_file)) is None or s.get("started_at") is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{mode}: the job never started; see {root}/coordinator.log")
                time.sleep(0.02)
            with Throttle(workers[0].pid, slowdown):
                while True:
                    s = read_status(status_file) or {}
                    hit = next(
                        (h for h in s.get("history", []) if h.get("accuracy", 0.0) >= target), None
                    )
                    if hit is not None:
                        break
                    if s.get("state") == "finished" or time.monotonic() > deadline:
                        best = max(
                            (h.get("accuracy", 0.0) for h in s.get("history", [])), default=0.0
                        )
                        raise SystemExit(
                            f"{mode}: never reached accuracy {target} (best {best:.3f})"
                        )
                    time.sleep(0.05)
            return {
                "seconds": hit["at"] - s["started_at"],
                "versions": hit["version"],
                "accuracy": hit["accuracy"],
                "rejected_stale": s["totals"].get("rejected_stale", 0),
            }
        finally:
            for p in procs:
                p.kill()
                p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--slowdown", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    print(
        f"digits, 4 workers, one {args.slowdown:g}x slower; time from first work to accuracy >= "
        f"{args.target}"
    )
    print(
        f"{'run':>3} {'mode':<7} {'seconds':>8} {'versions':>9} {'accuracy':>9} "
        f"{'refused stale':>14}"
    )
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    for run in range(args.repeats):
        order = list(MODES) if run % 2 == 0 else list(reversed(MODES))  # neither always goes first
        for mode in order:
            r = time_to_accuracy(mode, args.target, args.slowdown, seed=run, timeout=args.timeout)
            seconds[mode].append(r["seconds"])
            print(
                f"{run + 1:>3} {mode:<7} {r['seconds']:>8.2f} {r['versions']:>9.0f} "
                f"{r['accuracy']:>9.3f} {r['rejected_stale']:>14.0f}",
                flush=True,
            )
    sync, asyn = statistics.median(seconds["fedavg"]), statistics.median(seconds["async"])
    ratios = [f / a for f, a in zip(seconds["fedavg"], seconds["async"], strict=True)]
    print(
        f"median: fedavg {sync:.2f} s, async {asyn:.2f} s; fedavg / async = {sync / asyn:.2f} "
        f"(per run: {', '.join(f'{r:.2f}' for r in ratios)}; target >= 2)"
    )
    bar_chart(
        "async_vs_sync",
        f"seconds to accuracy {args.target} with one {args.slowdown:g}x straggler (median)",
        {"fedavg (sync)": sync, "async": asyn},
        "s",
    )


if __name__ == "__main__":
    main()
