"""``elastic job ...`` and ``elastic members``: operating jobs over the control API.

Tables for people, ``--output json`` for scripts. Exit status: 0 ok; 1 the
operation failed (e.g. the job already finished, or a followed job did not
finish); 2 bad input (a job spec that does not validate); 3 no coordinator
reachable; 4 no such job.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from elastic.cli.control import ControlClient, control_endpoint
from elastic.errors import ControlError, Unreachable

__all__ = ["cmd_job", "cmd_members", "cmd_report"]

DONE = ("finished", "budget_spent", "failed", "cancelled")
ENDED_WELL = ("finished", "budget_spent")  # (budget_spent: its privacy budget ended it)


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(
        control_endpoint(args.coordinator, args.membership),
        args.timeout,
        args.curve_key,
        args.coordinator_key,
    )


def _print(args: argparse.Namespace, data: Any, table: Table | str | None = None) -> None:
    if args.output == "json":
        print(json.dumps(data, indent=2, default=str))
    elif table is not None:
        console = Console()
        if not console.is_terminal:
            console.width = 160  # piped: keep rows whole
        console.print(table)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*[_cell(v) for v in row])
    return table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def cmd_job(args: argparse.Namespace) -> int:
    return int(globals()[f"_job_{args.job_command}"](args))


def _job_ls(args: argparse.Namespace) -> int:
    data, _ = _client(args).call("ls")
    rows = [
        [
            j["job"],
            j["task"],
            j["rule"],
            j["state"],
            f"{j['round']}/{j['rounds']}",
            j["version"],
            j["members"],
        ]
        for j in data["jobs"]
    ]
    _print(
        args,
        data["jobs"],
        _table("jobs", ["job", "task", "rule", "state", "round", "version", "members"], rows),
    )
    return 0


def _job_status(args: argparse.Namespace) -> int:
    status, _ = _client(args).call("status", job=args.id)
    last = status.get("last") or {}
    fields = [
        ("state", status["state"]),
        ("round", f"{status['round']}/{status['rounds']}"),
        ("version", status["version"]),
        ("members", status["members"]),
        ("rule", status["rule"]),
        ("task", status["task"]),
        ("loss", last.get("loss")),
        ("accuracy", last.get("accuracy")),
        *_privacy_fields(last, status.get("final") or {}),
        ("wall seconds", status["wall_seconds"]),
        ("bytes sent", status["totals"]["bytes_sent"]),
        ("bytes received", status["totals"]["bytes_received"]),
        ("updates", status["totals"]["updates"]),
        ("rejected", status["totals"]["rejected"]),
    ]
    table = Table(title=f"job {status['job']}", show_header=False)
    for key, value in fields:
        table.add_row(key, _cell(value))
    _print(args, status, table)
    return 0


def _privacy_fields(last: dict, final: dict) -> list[tuple[str, object]]:
    """The privacy spent, when the job has differential privacy: ε at δ, the noise, the clip."""
    if "epsilon" not in last:
        return []
    fields: list[tuple[str, object]] = [
        ("privacy", f"ε = {last['epsilon']:.4g} at δ = {last.get('dp_delta', 0):.3g}"),
        ("noise multiplier", last.get("noise_multiplier")),
        ("clip norm", last.get("clip_norm")),
    ]
    if "stopped" in final:
        fields.append(("stopped", final["stopped"]))
    return fields


def _job_submit(args: argparse.Namespace) -> int:
    import tomllib  # noqa: PLC0415

    from elastic.jobspec import load_job_spec  # noqa: PLC0415

    spec = load_job_spec(args.spec)  # syntax and keys checked here; plugins by the coordinator
    raw = tomllib.loads(Path(args.spec).read_text(encoding="utf-8"))
    raw.setdefault("job", {}).setdefault("id", spec.id)
    client = _client(args)
    data, _ = client.call("submit", spec=raw, source=str(args.spec), default_id=spec.id)
    if args.output == "json" and not args.follow:
        _print(args, data)
    elif args.output != "json":
        print(f"submitted job {data['job']}")
    return _follow(args, client, data["job"]) if args.follow else 0


def _follow(args: argparse.Namespace, client: ControlClient, job_id: str) -> int:
    """A live progress bar until the job ends; exit 0 if it finished."""
    console = Console(stderr=True)
    status, _ = client.call("status", job=job_id)
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[line]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, disable=args.output == "json") as progress:
        bar = progress.add_task(job_id, total=status["rounds"], line="")
        while True:
            last = status.get("last") or {}
            figures = [f"members {status['members']}", status["state"]]
            figures += [
                f"{k} {last[k]:.4f}" for k in ("loss", "accuracy") if isinstance(last.get(k), float)
            ]
            moved = status["totals"]["bytes_sent"] + status["totals"]["bytes_received"]
            figures.append(f"{moved / 1e6:.1f} MB")
            progress.update(bar, completed=status["round"], line="  ".join(figures))
            if status["state"] in DONE:
                break
            time.sleep(0.5)
            status, _ = client.call("status", job=job_id)
    if args.output == "json":
        _print(args, status)
    else:
        console.print(
            f"job {job_id}: {status['state']} at round {status['round']}/{status['rounds']}"
        )
    return 0 if status["state"] in ENDED_WELL else 1


def _desire(args: argparse.Namespace) -> int:
    data, _ = _client(args).call(args.job_command, job=args.id)
    if args.output == "json":
        _print(args, data)
    else:
        print(
            f"job {data['job']}: {data['desired']} (state {data['state']}, round {data['round']})"
        )
    return 0


_job_pause = _job_resume = _job_finish = _job_cancel = _desire


def _job_export(args: argparse.Namespace) -> int:
    from elastic.cli.commands import _export  # noqa: PLC0415

    data, tensors = _client(args).call("export", job=args.id)
    if not tensors:
        raise ControlError("failed", f"job {args.id} sent no model")
    _export({k: t.to_tensor() for k, t in tensors.items()}, args.out)
    if args.output == "json":
        _print(args, data | {"out": str(args.out)})
    else:
        print(
            f"wrote the model of job {data['job']} (round {data['round']}, version "
            f"{data['version']}) to {args.out}"
        )
    return 0


def _job_logs(args: argparse.Namespace) -> int:
    client, since = _client(args), 0
    while True:
        data, _ = client.call("logs", job=args.id, since=since)
        for entry in data["entries"]:
            print(
                json.dumps(entry)
                if args.output == "json"
                else " ".join(f"{k}={_cell(v)}" for k, v in entry.items()),
                flush=True,
            )
        since = data["next"]
        if not args.follow or (data["state"] in DONE and not data["entries"]):
            return 0
        if not data["entries"]:
            time.sleep(1.0)


def cmd_members(args: argparse.Namespace) -> int:
    data, _ = _client(args).call("members")
    rows = [
        [
            m["id"],
            m["host"],
            m["device"],
            m["slot"],
            "yes" if m["busy"] else "no",
            m["joined_seconds_ago"],
            m["seen_seconds_ago"],
        ]
        for m in data["members"]
    ]
    _print(
        args,
        data["members"],
        _table(
            "members",
            ["worker", "host", "device", "slot", "busy", "joined s ago", "seen s ago"],
            rows,
        ),
    )
    return 0


REPORT_FORMATS = {".png": "png", ".html": "html", ".htm": "html"}


def cmd_report(args: argparse.Namespace) -> int:
    from elastic.report import render  # noqa: PLC0415

    fmt = args.format or REPORT_FORMATS.get(args.out.suffix.lower())
    if fmt is None:
        raise ControlError(
            "bad_request",
            f"--out {args.out}: cannot tell a format from {args.out.suffix or 'no suffix'!r}; "
            "name a .png or .html file, or give --format png|html",
        )
    folder = Path(args.id)
    if args.state_dir is not None:
        status = _stored_status(args.state_dir, args.id)
    elif folder.is_dir():  # a run's folder (elastic run's --state-dir): no coordinator asked
        status = _stored_status(folder, None)
    else:
        try:
            status, _ = _client(args).call("report", job=args.id)
        except Unreachable as exc:
            raise Unreachable(
                f"{exc}; for a finished `elastic run`, give its folder instead of the id: "
                f"elastic report runs/{args.id}-TIME --out {args.out}"
            ) from None
    render(status, args.out, fmt)
    print(f"wrote the report of job {status['job']} ({status['round']} rounds) to {args.out}")
    return 0


def _stored_status(state_dir: Path, job_id: str | None) -> dict[str, Any]:
    """A job's status.json in a state directory: ``job_id``'s, or (None) the one job's
    there, or the folder's own."""
    if job_id is None:
        found = sorted(state_dir.glob("*/status.json")) or sorted(state_dir.glob("status.json"))
        if len(found) != 1:
            jobs = ", ".join(p.parent.name for p in found) or "none"
            raise ControlError(
                "no_such_job",
                f"{state_dir} holds {len(found)} jobs' status ({jobs}); give the job's own "
                f"folder, or: elastic report ID --state-dir {state_dir}",
            )
        path = found[0]
    else:
        path = state_dir / job_id / "status.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ControlError(
            "no_such_job", f"no status of job {job_id} in {state_dir} ({path} does not exist)"
        ) from None
