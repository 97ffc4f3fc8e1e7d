"""The subcommands behind ``elastic``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from elastic.cli.daemons import set_threads
from elastic.config import CoordinatorConfig
from elastic.coordinator.checkpoints import atomic_write
from elastic.coordinator.job import ENDED_WELL, check_spec
from elastic.coordinator.threads import FOLD_THREADS
from elastic.errors import ConfigError, ElasticError, JobSpecError
from elastic.jobspec import JobSpec, load_job_spec
from elastic.logs import setup_logging
from elastic.plugins import Plugins
from elastic.tasks import Shard

__all__ = ["cmd_run", "cmd_plugins", "cmd_validate"]


def _flags(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n, None) for n in names}


# -------------------------------------------------------------------- tools --


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins = Plugins()
    rows = [
        (i.kind, i.name, f"{i.cls.__module__}.{i.cls.__qualname__}", i.distribution)
        for i in plugins.provided()
    ]
    rows += [("observer", plugin, "-", dist) for plugin, dist in plugins.observers()]
    if args.output == "json":
        print(
            json.dumps(
                [
                    dict(zip(("kind", "name", "class", "distribution"), r, strict=True))
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    table = Table(title="elastic plugins")
    for col in ("kind", "name", "class", "distribution"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console.width = 160  # a pipe or a log: no terminal width to fit, keep rows whole
    console.print(table)
    return 0


def _shards_by_slot(spec: JobSpec, plugins: Plugins) -> bool:
    """Whether each worker trains the shard of its slot (train-mode rules without
    virtual clients), so that a shard without a worker goes untrained; gradient
    rules split by rank instead, virtual clients are sampled."""
    return not spec.clients and plugins.rule(spec.rule).worker_mode != "gradient"


def _check_client_data(spec: JobSpec, plugins: Plugins, data_dir: Path | None) -> str:
    """With virtual clients: the last client's data built here, so that more clients
    than the data can fill is refused now (the task's ``JobSpecError``, with the
    numbers), not on every worker later. A note when the data is not on this machine."""
    if not spec.clients:
        return ""
    task = plugins.task(spec.task)(spec.task_params)
    try:
        dataset = task.train_dataset(Shard(spec.clients - 1, spec.clients, spec.seed), data_dir)
        size = len(dataset)  # type: ignore[arg-type]
    except JobSpecError as exc:
        raise JobSpecError(f"job {spec.id}: [job] clients = {spec.clients}: {exc}") from None
    except Exception as exc:  # the data may live on the workers only
        return f"note: the clients' data was not checked here ({type(exc).__name__}: {exc})"
    if size == 0:
        raise JobSpecError(
            f"job {spec.id}: [job] clients = {spec.clients}: client {spec.clients - 1} gets no "
            "data; use fewer clients or more data"
        )
    return ""


def _import_beside(job: Path) -> str:
    """Put the job file's directory on this process's import path: on one machine
    (``validate``, ``run``, ``simulate``) a task or rule module beside the job file
    (``task = "my_tasks:MyTask"``) is found as a file beside it is."""
    job_dir = str(Path(job).resolve().parent)
    sys.path.insert(0, job_dir)
    return job_dir


def cmd_validate(args: argparse.Namespace) -> int:
    spec = load_job_spec(args.job)
    _import_beside(args.job)
    plugins = Plugins()
    check_spec(spec, plugins)
    note = _check_client_data(spec, plugins, args.data)
    print(
        f"{args.job}: ok (job {spec.id}: task {spec.task}, rule {spec.rule}, {spec.rounds} "
        f"rounds, min_workers {spec.min_workers})"
    )
    if _shards_by_slot(spec, plugins) and spec.shard_count > spec.min_workers:
        print(
            f"note: the data is in {spec.shard_count} shards (partitions), one a worker: "
            f"with fewer than {spec.shard_count} workers some shards get no training"
        )
    if note:
        print(note)
    return 0


# ---------------------------------------------------------------------- run --


def cmd_run(args: argparse.Namespace) -> int:
    from elastic.cli.progress import ProgressObserver
    from elastic.coordinator.daemon import Coordinator

    if args.local_workers < 1:
        raise ConfigError(f"--local-workers must be >= 1, got {args.local_workers}")
    setup_logging(args.log_format, "warning" if not args.quiet else "error")
    spec = load_job_spec(args.job)
    if args.local_workers < spec.min_workers:
        raise ConfigError(
            f"job {spec.id} needs min_workers = {spec.min_workers} but --local-workers is "
            f"{args.local_workers}; "
            f"start at least {spec.min_workers} workers"
        )
    state_dir = (
        args.resume
        or args.state_dir
        or Path("runs") / f"{spec.id}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    console = Console(stderr=True)
    observer = ProgressObserver(spec.id, spec.rounds, console, enabled=not args.quiet)
    plugins = Plugins(extra=[observer])
    job_dir = _import_beside(args.job)  # and the local workers' too
    check_spec(spec, plugins)
    note = _check_client_data(spec, plugins, None)
    if note:
        console.print(note, soft_wrap=True)
    if _shards_by_slot(spec, plugins) and args.local_workers < spec.shard_count:
        console.print(
            f"note: job {spec.id} splits its data in {spec.shard_count} shards (partitions), "
            f"one a worker: with --local-workers {args.local_workers}, "
            f"{spec.shard_count - args.local_workers} get no training",
            soft_wrap=True,
        )
    keys = _local_keys(state_dir / "keys")
    config = CoordinatorConfig(
        bind="tcp://127.0.0.1:0",
        state_dir=state_dir,
        exit_when_done=True,
        curve_key=str(keys["coordinator"]),
        allow_workers=str(keys["workers"]),
        allow_admins=str(keys["admins"]),
    )
    config.validate()
    set_threads(FOLD_THREADS)
    coordinator = Coordinator(config, plugins, [spec])
    job = coordinator.core.engines[spec.id].job
    workers = _start_local_workers(
        coordinator.endpoint,
        args.local_workers,
        args.device,
        state_dir,
        ["--curve-key", str(keys["worker"]), "--coordinator-key", str(keys["coordinator_public"])],
        job_dir,
    )
    thread = threading.Thread(
        target=coordinator.run, kwargs={"install_signals": False}, name="coordinator", daemon=True
    )
    failure = ""
    with observer:
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.2)
                dead = [w for w in workers if w.poll() is not None]
                if len(dead) == len(workers) and not job.done:
                    failure = f"every local worker exited (see the logs in {state_dir / 'workers'})"
                    coordinator.stop(failure)
        except KeyboardInterrupt:
            failure = "interrupted"
            coordinator.stop(failure)
            thread.join(10)
    _stop_workers(workers)
    if failure == "interrupted":
        console.print(
            f"interrupted at round {job.round}; continue with: elastic run {args.job} --resume "
            f"{state_dir}",
            soft_wrap=True,
        )
        return 130
    if not job.done:
        raise ElasticError(
            f"job {spec.id} did not finish: {failure or 'coordinator stopped'}; resume it with "
            f"--resume {state_dir}"
        )
    figures = _figures(job, state_dir)
    if args.out:
        _export(job.model.state_dict(), args.out)
        figures["model"] = str(args.out)
    _report(console, figures, args.summary)
    return 0 if job.state in ENDED_WELL else 1


def cmd_simulate(args: argparse.Namespace) -> int:
    from elastic.cli.progress import ProgressObserver
    from elastic.simulation import ClientSpeeds, simulate

    setup_logging("kv", "warning" if not args.quiet else "error")
    spec = load_job_spec(args.job)
    state_dir = args.state_dir or Path("runs") / f"{spec.id}-sim-{time.strftime('%Y%m%d-%H%M%S')}"
    console = Console(stderr=True)
    observer = ProgressObserver(spec.id, spec.rounds, console, enabled=not args.quiet)
    plugins = Plugins(extra=[observer])
    _import_beside(args.job)
    check_spec(spec, plugins)
    attackers = {}
    for item in args.attack:
        index, _, attack = item.partition("=")
        if not index.isdigit() or int(index) >= args.workers:
            raise ConfigError(
                f"--attack {item!r}: give a worker index below --workers and an attack, e.g. "
                "--attack 0=signflip:10"
            )
        attackers[int(index)] = attack
    speeds = (
        ClientSpeeds.parse(args.client_speed, args.sample_time, spec.seed)
        if args.client_speed
        else None
    )
    with observer:
        job = simulate(spec, args.workers, plugins, state_dir, args.data, attackers, speeds)
    _report(console, _figures(job, state_dir), args.summary)
    return 0 if job.state in ENDED_WELL else 1


def _figures(job: Any, state_dir: Path) -> dict[str, Any]:
    final = job.history[-1] if job.history else {}
    return {
        "job": job.spec.id,
        "state": str(job.state),
        "rounds": job.round,
        "accuracy": final.get("accuracy"),
        "loss": final.get("eval_loss", final.get("loss")),
        "train_loss": final.get("loss"),
        "wall_seconds": round(job.wall_seconds(), 3),  # includes the time before a --resume
        "bytes_sent": job.totals["bytes_sent"],
        "bytes_received": job.totals["bytes_received"],
        "model": str(job.dir / "final.safetensors"),
        "state_dir": str(state_dir),
        **{k: final[k] for k in ("epsilon", "dp_delta", "noise_multiplier") if k in final},
        **({"stopped": job.final_metrics["stopped"]} if "stopped" in job.final_metrics else {}),
    }


def _report(console: Console, figures: dict[str, Any], summary: Path | None) -> None:
    if summary:
        data = json.dumps(figures, indent=2).encode()
        atomic_write(summary, lambda f: f.write(data))
    _print_result(console, figures)
    console.print(
        f"plots: elastic report {figures['state_dir']} --out report.png (or .html)",
        soft_wrap=True,
    )


def _local_keys(directory: Path) -> dict[str, Path]:
    """CURVE keys for a local run (made once, kept with its state for --resume):
    even on loopback nothing travels in plaintext."""
    from elastic.security import generate  # noqa: PLC0415

    paths = {
        "coordinator": directory / "coordinator.key_secret",
        "coordinator_public": directory / "coordinator.key",
        "workers": directory / "workers",
        "worker": directory / "workers" / "local.key_secret",
        "admins": directory / "admins",
    }
    for where, name in (
        (directory, "coordinator"),
        (directory / "workers", "local"),
        (directory / "admins", "admin"),
    ):
        if not (where / f"{name}.key_secret").exists():
            generate(where, name)
    return paths


def _start_local_workers(
    endpoint: str, n: int, device: str, state_dir: Path, extra: list[str], job_dir: str
) -> list[subprocess.Popen]:
    logs = state_dir / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // n)
    path = os.pathsep.join(p for p in (job_dir, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    procs = []
    for i in range(n):
        log = open(logs / f"local-{i}.log", "ab")  # noqa: SIM115 - owned by the child
        cmd = [
            sys.executable,
            "-m",
            "elastic",
            "worker",
            "--coordinator",
            endpoint,
            "--id",
            f"local-{i}",
            "--device",
            device,
            "--threads",
            str(threads),
            "--log-level",
            "info",
            *extra,
        ]
        procs.append(
            subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        )
        log.close()
    return procs


def _stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 5
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _export(state: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if path.suffix == ".safetensors":
        import safetensors.torch

        data = safetensors.torch.save(tensors)
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_write(path, lambda f: torch.save(tensors, f))


def _print_result(console: Console, figures: dict[str, Any]) -> None:
    table = Table(title=f"job {figures['job']}: {figures['state']}", show_header=False)
    for key in (
        "rounds",
        "accuracy",
        "loss",
        "train_loss",
        "wall_seconds",
        "bytes_sent",
        "bytes_received",
        "epsilon",
        "dp_delta",
        "noise_multiplier",
        "stopped",
        "model",
    ):
        value = figures.get(key)
        if value is None:
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def cmd_keys(args: argparse.Namespace) -> int:
    from elastic.security import generate

    public, secret = generate(args.out, args.name)
    print(
        f"wrote {public} (public: give it to whoever must trust this key) and {secret} (secret: "
        "keep it here)"
    )
    return 0
