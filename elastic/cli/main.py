"""``elastic``: the command line.

User errors end as one line naming the problem and the fix, exit status 2; add
``--debug`` for the traceback. Exit status 1 means the job itself failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from elastic import __version__
from elastic.errors import ElasticError

__all__ = ["main"]


def add_control_flags(p: argparse.ArgumentParser) -> None:
    """Where the control API is, and how to answer: for ``elastic job`` and ``elastic members``."""
    p.add_argument(
        "--coordinator",
        default=None,
        help="the coordinator's control endpoint (default: $ELASTIC_CONTROL, else "
        "tcp://127.0.0.1:5556)",
    )
    p.add_argument(
        "--membership",
        default=None,
        help="etcd://HOST:PORT[,...]/CLUSTER or zk://HOST:PORT[,...]/CLUSTER: ask whichever "
        "coordinator leads there",
    )
    p.add_argument("--output", choices=["table", "json"], default="table")
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)"
    )
    p.add_argument(
        "--curve-key",
        default=os.environ.get("ELASTIC_CURVE_KEY"),
        help="your admin secret key file, when the coordinator uses CURVE ($ELASTIC_CURVE_KEY)",
    )
    p.add_argument(
        "--coordinator-key",
        default=os.environ.get("ELASTIC_COORDINATOR_KEY"),
        help="the coordinator's public key file ($ELASTIC_COORDINATOR_KEY)",
    )


def _daemon_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file with a [coordinator] / [worker] table")
    p.add_argument(
        "--log-format", choices=["kv", "json"], default=None, help="log line format (default kv)"
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elastic", description="Federated / elastic training daemon."
    )
    parser.add_argument("--version", action="version", version=f"elastic {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    # --debug also after the subcommand; SUPPRESS keeps a main-level --debug from being reset
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )

    p = sub.add_parser(
        "run", parents=[debug], help="run a job end to end: embedded coordinator + local workers"
    )
    p.add_argument("job", type=Path, help="job spec (TOML)")
    p.add_argument(
        "--local-workers", type=int, default=2, help="worker processes to start (default 2)"
    )
    p.add_argument(
        "--device", default="cpu", help="device of the local workers (auto, cpu, cuda:N)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="checkpoints and status (default runs/<job>-<time>)",
    )
    p.add_argument(
        "--resume", type=Path, default=None, help="continue a run from its state directory"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="also write the final model here (.safetensors or .pt)",
    )
    p.add_argument(
        "--summary", type=Path, default=None, help="write the final figures here as JSON"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--log-format", choices=["kv", "json"], default="kv")

    p = sub.add_parser(
        "simulate",
        parents=[debug],
        help="run a job in this process: the real engine and worker runtime, no sockets",
    )
    p.add_argument("job", type=Path, help="job spec (TOML)")
    p.add_argument("--workers", type=int, default=4, help="simulated workers (default 4)")
    p.add_argument(
        "--client-speed",
        default="",
        metavar="lognormal:SIGMA",
        help="simulated client speeds, log-normal with median 1: each update arrives after "
        "samples x epochs x --sample-time / speed simulated seconds, and round_timeout leaves "
        "the slow out",
    )
    p.add_argument(
        "--sample-time",
        type=float,
        default=0.01,
        help="simulated seconds a sample takes a client of speed 1 per epoch (default 0.01)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="checkpoints and status (default runs/<job>-sim-<time>)",
    )
    p.add_argument("--data", type=Path, default=None, help="data directory handed to the task")
    p.add_argument(
        "--summary", type=Path, default=None, help="write the final figures here as JSON"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--attack",
        action="append",
        default=[],
        metavar="N=KIND:VALUE",
        help="make worker N Byzantine: signflip:FACTOR or noise:STDDEV (repeatable)",
    )

    p = sub.add_parser("coordinator", parents=[debug], help="run the coordinator daemon")
    p.add_argument(
        "--bind", default=None, help="ZeroMQ endpoint to serve on (default tcp://127.0.0.1:5555)"
    )
    p.add_argument(
        "--control",
        default=None,
        help="endpoint of the control API for `elastic job` (default: --bind's port + 1)",
    )
    p.add_argument(
        "--job", type=Path, action="append", default=[], help="job spec to serve (repeatable)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="checkpoints and status (default ./elastic-state)",
    )
    p.add_argument(
        "--membership",
        default=None,
        help="embedded:// (default), etcd://HOST:PORT[,...]/CLUSTER or "
        "zk://HOST:PORT[,...]/CLUSTER (election + membership)",
    )
    p.add_argument(
        "--id", default=None, help="this coordinator's name in elections (default HOSTNAME-PID)"
    )
    p.add_argument(
        "--lease-ttl",
        type=float,
        default=None,
        help="etcd, zk: seconds before a dead leader is replaced (default 10)",
    )
    p.add_argument("--heartbeat-interval", type=float, default=None)
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        help="seconds of silence before a worker is removed (default 3)",
    )
    p.add_argument("--max-message-bytes", type=int, default=None)
    p.add_argument(
        "--upload-window",
        type=int,
        default=None,
        help="bytes of big updates let in at once (default 16 MiB; one always goes): bounds "
        "memory with many workers",
    )
    p.add_argument(
        "--upload-part",
        type=int,
        default=None,
        help="big updates come in parts of about this many bytes, for rules that fold parts "
        "(default 4 MiB; 0: whole)",
    )
    p.add_argument(
        "--no-shared-memory",
        dest="shared_memory",
        action="store_const",
        const=False,
        default=None,
        help="send tensors to workers on this host over the socket too (default: through /dev/shm)",
    )
    p.add_argument(
        "--exit-when-done",
        action="store_const",
        const=True,
        default=None,
        help="exit once every job is finished",
    )
    p.add_argument(
        "--curve-key",
        default=None,
        help="this coordinator's secret key file (NAME.key_secret from `elastic keys generate`)",
    )
    p.add_argument(
        "--allow-workers",
        default=None,
        help="directory of the public keys (*.key) of the workers allowed to join",
    )
    p.add_argument(
        "--allow-admins",
        default=None,
        help="directory of the public keys allowed to use the control API (elastic job ...)",
    )
    p.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        default=None,
        help="plaintext and no authentication (a trusted network only)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics, /healthz and /readyz on this port (default: off)",
    )
    p.add_argument(
        "--metrics-host",
        default=None,
        help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 for all)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for checking and folding updates (default 1: that work "
        "comes a frame at a time, and more threads only contend with workers on this host)",
    )
    _daemon_flags(p)

    p = sub.add_parser("worker", parents=[debug], help="run a worker daemon")
    p.add_argument(
        "--coordinator",
        default=None,
        help="coordinator endpoint, e.g. tcp://HOST:5555 (default: the leader --membership names, "
        "else tcp://127.0.0.1:5555)",
    )
    p.add_argument("--id", default=None, help="worker id (default HOSTNAME-PID)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument(
        "--data", type=Path, default=None, help="this worker's data directory, handed to the task"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default torch's)"
    )
    p.add_argument(
        "--coordinator-timeout",
        type=float,
        default=None,
        help="seconds of coordinator silence before reconnecting (default 10)",
    )
    p.add_argument(
        "--membership",
        default=None,
        help="etcd://... or zk://...: register there under a lease, follow its leader (default: "
        "none)",
    )
    p.add_argument(
        "--lease-ttl",
        type=float,
        default=None,
        help="seconds a crashed worker stays registered (default 10)",
    )
    p.add_argument(
        "--curve-key",
        default=None,
        help="this worker's secret key file (NAME.key_secret from `elastic keys generate`)",
    )
    p.add_argument(
        "--coordinator-key", default=None, help="the coordinator's public key file (NAME.key)"
    )
    p.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        default=None,
        help="plaintext and no authentication (a trusted network only)",
    )
    p.add_argument("--max-message-bytes", type=int, default=None)
    p.add_argument(
        "--no-shared-memory",
        dest="shared_memory",
        action="store_const",
        const=False,
        default=None,
        help="on the coordinator's host, exchange tensors over the socket too (default: through "
        "/dev/shm)",
    )
    _daemon_flags(p)

    p = sub.add_parser(
        "job",
        parents=[debug],
        help="operate jobs on a running coordinator (submit, ls, status, pause, resume, finish, "
        "cancel, export, logs)",
    )
    jobs = p.add_subparsers(dest="job_command", required=True)
    q = jobs.add_parser("submit", parents=[debug], help="hand a job spec to the coordinator")
    q.add_argument("spec", type=Path, help="job spec (TOML)")
    q.add_argument(
        "--follow", action="store_true", help="show a live progress bar until the job ends"
    )
    add_control_flags(q)
    q = jobs.add_parser("ls", parents=[debug], help="the coordinator's jobs")
    add_control_flags(q)
    for name, text in (
        ("status", "one job in detail"),
        ("pause", "no new round starts; the one running still commits"),
        ("resume", "go on from the round reached"),
        (
            "finish",
            "end now, as if the rounds were done: the round running is the last, the final model "
            "is written",
        ),
        ("cancel", "stop for good; the last checkpoint stays"),
    ):
        q = jobs.add_parser(name, parents=[debug], help=text)
        q.add_argument("id", help="job id")
        add_control_flags(q)
    q = jobs.add_parser("export", parents=[debug], help="download the job's current model")
    q.add_argument("id", help="job id")
    q.add_argument(
        "--out", type=Path, required=True, help="where to write it (.safetensors or .pt)"
    )
    add_control_flags(q)
    q = jobs.add_parser("logs", parents=[debug], help="the job's rounds, one line each")
    q.add_argument("id", help="job id")
    q.add_argument(
        "--follow",
        action="store_true",
        help="keep printing rounds as they commit, until the job ends",
    )
    add_control_flags(q)

    p = sub.add_parser("members", parents=[debug], help="the workers a coordinator has now")
    add_control_flags(p)

    p = sub.add_parser(
        "report",
        parents=[debug],
        help="plots of a job's run: loss, accuracy, members over time, bytes per round",
    )
    p.add_argument("id", help="job id")
    p.add_argument("--out", type=Path, required=True, help="the file to write")
    p.add_argument(
        "--format",
        choices=["png", "html"],
        default=None,
        help="default: from --out's suffix, else png",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="read STATE_DIR/ID/status.json instead of asking a coordinator",
    )
    add_control_flags(p)

    p = sub.add_parser(
        "keys", parents=[debug], help="CURVE key pairs for coordinators, workers and admins"
    )
    keys = p.add_subparsers(dest="keys_command", required=True)
    q = keys.add_parser(
        "generate",
        parents=[debug],
        help="write NAME.key (public: share it) and NAME.key_secret (secret: keep it)",
    )
    q.add_argument("name", help="e.g. coordinator, worker-1, alice")
    q.add_argument(
        "--out", type=Path, default=Path("."), help="directory to write them in (default .)"
    )

    p = sub.add_parser(
        "plugins", parents=[debug], help="list installed plugins and the distribution of each"
    )
    p.add_argument("--output", choices=["table", "json"], default="table")

    p = sub.add_parser(
        "validate", parents=[debug], help="check a job spec against the installed plugins"
    )
    p.add_argument("job", type=Path)
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="the data directory a worker would be given, to check the clients' data",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ElasticError as exc:
        if args.debug:
            raise
        print(f"elastic: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.debug:
        logging.getLogger("elastic").setLevel(logging.DEBUG)
    if args.command in ("job", "members", "report"):  # clients of the control API: no torch to load
        from elastic.cli import jobs  # noqa: PLC0415

        return int(getattr(jobs, f"cmd_{args.command}")(args))
    if args.command in ("coordinator", "worker"):  # settings checked before torch loads
        from elastic.cli import daemons  # noqa: PLC0415

        return int(getattr(daemons, f"cmd_{args.command}")(args))
    from elastic.cli import commands  # noqa: PLC0415

    return int(getattr(commands, f"cmd_{args.command}")(args))


if __name__ == "__main__":
    sys.exit(main())
