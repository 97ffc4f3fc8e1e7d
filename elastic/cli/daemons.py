"""``elastic coordinator`` and ``elastic worker``: the daemons' settings read and
checked before torch and the plugins are loaded, so a bad flag is one line at once
(about 0.1 s, not the 1.4 s of importing torch)."""

from __future__ import annotations

import argparse
from typing import Any

from elastic.config import CoordinatorConfig, WorkerConfig, resolve
from elastic.errors import ConfigError
from elastic.logs import setup_logging

__all__ = ["cmd_coordinator", "cmd_worker", "set_threads"]


def _flags(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n, None) for n in names}


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads for this process (None: torch's default)."""
    _check_threads(threads)
    if threads is not None:
        import torch  # noqa: PLC0415

        torch.set_num_threads(threads)


def cmd_coordinator(args: argparse.Namespace) -> int:
    _check_threads(args.threads)
    loaded: list[Any] = []  # the plugins, loaded once the settings are sound

    def read() -> tuple[CoordinatorConfig, list[Any]]:  # at start, and again on SIGHUP
        config = resolve(
            CoordinatorConfig,
            "coordinator",
            args.config,
            _flags(
                args,
                "bind",
                "control",
                "state_dir",
                "membership",
                "id",
                "lease_ttl",
                "heartbeat_interval",
                "heartbeat_timeout",
                "max_message_bytes",
                "upload_window",
                "upload_part",
                "shared_memory",
                "exit_when_done",
                "metrics_port",
                "metrics_host",
                "curve_key",
                "allow_workers",
                "allow_admins",
                "insecure",
                "log_format",
                "log_level",
            ),
        )
        from elastic.coordinator.job import check_spec  # noqa: PLC0415 - torch, the plugins
        from elastic.jobspec import load_job_spec  # noqa: PLC0415
        from elastic.plugins import Plugins  # noqa: PLC0415

        if not loaded:
            loaded.append(Plugins())
        specs = [load_job_spec(p) for p in args.job]
        for spec in specs:
            check_spec(spec, loaded[0])
        return config, specs

    config, specs = read()
    from elastic.coordinator.daemon import Coordinator  # noqa: PLC0415
    from elastic.coordinator.threads import FOLD_THREADS  # noqa: PLC0415

    setup_logging(config.log_format, config.log_level)
    set_threads(FOLD_THREADS if args.threads is None else args.threads)
    coordinator = Coordinator(config, loaded[0], specs, reloader=read)
    coordinator.run()
    return coordinator.exit_code


def cmd_worker(args: argparse.Namespace) -> int:
    _check_threads(args.threads)

    def read() -> WorkerConfig:  # at start, and again on SIGHUP
        return resolve(
            WorkerConfig,
            "worker",
            args.config,
            _flags(
                args,
                "coordinator",
                "id",
                "device",
                "data",
                "coordinator_timeout",
                "membership",
                "lease_ttl",
                "max_message_bytes",
                "shared_memory",
                "curve_key",
                "coordinator_key",
                "insecure",
                "log_format",
                "log_level",
            ),
        )

    config = read()
    from elastic.plugins import Plugins  # noqa: PLC0415 - torch, once the settings are sound
    from elastic.worker.daemon import Worker  # noqa: PLC0415

    setup_logging(config.log_format, config.log_level)
    set_threads(args.threads)
    Worker(config, Plugins(), reloader=read).run()
    return 0
