"""Typed daemon settings: a TOML file < environment ``ELASTIC_*`` < command-line flags.

Each daemon has one dataclass; every field can come from its table in the config
file (``[coordinator]`` / ``[worker]``), from ``ELASTIC_<FIELD>`` in the environment,
or from a flag. Values are converted and validated once, with errors that name the
source and the fix.
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from elastic.errors import ConfigError
from elastic.membership.cluster import open_backend

__all__ = ["CoordinatorConfig", "WorkerConfig", "resolve", "apply_reload"]

C = TypeVar("C")


@dataclass
class CoordinatorConfig:
    bind: str = "tcp://127.0.0.1:5555"
    control: str = ""  # the control API's endpoint; default: bind's port + 1 (5556)
    state_dir: Path = Path("elastic-state")
    membership: str = "embedded://"
    id: str = ""  # this coordinator's name in elections (default HOSTNAME-PID)
    lease_ttl: float = 10.0  # etcd, zk: a dead leader is replaced within about this long
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.0
    max_message_bytes: int = 4 << 30
    # Bytes of big updates granted and not yet received: what the coordinator may be
    # holding in receive buffers at once (one update or part always goes, however big).
    upload_window: int = 16 << 20
    # Big updates come in parts of about this many bytes (elastic.wire.parts) where the
    # rule folds parts: the coordinator then holds a part, not a whole update. 0: whole.
    upload_part: int = 4 << 20
    # Workers on this host get model and updates through /dev/shm (elastic.wire.shm).
    shared_memory: bool = True
    exit_when_done: bool = False
    metrics_port: int = 0  # Prometheus /metrics, /healthz, /readyz; 0 = not served
    metrics_host: str = "127.0.0.1"
    curve_key: str = ""  # this coordinator's secret key file (NAME.key_secret)
    allow_workers: str = ""  # directory of the public keys (*.key) of workers allowed in
    allow_admins: str = ""  # directory of the public keys of who may use the control API
    insecure: bool = False  # plaintext, no authentication: only when asked for
    log_format: str = "kv"
    log_level: str = "info"

    def validate(self) -> None:
        _check_endpoint("bind", self.bind)
        self.control = self.control or default_control(self.bind)
        _check_endpoint("control", self.control)
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(
                f"metrics_port must be a TCP port (1-65535), or 0 for none; got {self.metrics_port}"
            )
        if not self.id:
            self.id = f"{socket.gethostname()}-{os.getpid()}"
        open_backend(self.membership)  # its URL checked now: one clear error at start
        if self.lease_ttl < 2:
            raise ConfigError(f"lease_ttl must be at least 2 seconds, got {self.lease_ttl}")
        _positive("heartbeat_interval", self.heartbeat_interval)
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                f"heartbeat_timeout ({self.heartbeat_timeout}s) must be longer than "
                f"heartbeat_interval ({self.heartbeat_interval}s); e.g. 3x the interval"
            )
        _positive("max_message_bytes", self.max_message_bytes)
        if self.upload_window < 0:
            raise ConfigError(
                "upload_window must be >= 0 bytes (0: one big update at a time), got "
                f"{self.upload_window}"
            )
        if self.upload_part != 0 and self.upload_part < 4096:
            raise ConfigError(
                "upload_part must be 0 (updates come whole) or >= 4096 bytes, got "
                f"{self.upload_part}"
            )
        _log_settings(self.log_format, self.log_level)
        _check_security(
            self.insecure,
            {
                "curve_key": self.curve_key,
                "allow_workers": self.allow_workers,
                "allow_admins": self.allow_admins,
            },
        )


@dataclass
class WorkerConfig:
    coordinator: str = (
        ""  # default: the leader the cluster names (--membership), else tcp://127.0.0.1:5555
    )
    id: str = ""
    device: str = "auto"
    data: Path | None = None
    coordinator_timeout: float = 10.0
    membership: str = ""  # etcd://..., zk://...: also register there, under a lease
    lease_ttl: float = 10.0
    max_message_bytes: int = 4 << 30
    shared_memory: bool = True  # on the coordinator's host: tensors through /dev/shm
    curve_key: str = ""  # this worker's secret key file (NAME.key_secret)
    coordinator_key: str = ""  # the coordinator's public key file (NAME.key)
    insecure: bool = False  # plaintext, no authentication: only when asked for
    log_format: str = "kv"
    log_level: str = "info"

    def validate(self) -> None:
        shared = open_backend(self.membership).shared if self.membership else False
        if not shared and not self.coordinator:
            self.coordinator = "tcp://127.0.0.1:5555"
        if self.coordinator:
            _check_endpoint("coordinator", self.coordinator)
        if self.lease_ttl < 2:
            raise ConfigError(f"lease_ttl must be at least 2 seconds, got {self.lease_ttl}")
        if not self.id:
            self.id = f"{socket.gethostname()}-{os.getpid()}"
        if len(self.id) > 128 or not self.id.isprintable() or "/" in self.id:
            raise ConfigError(
                f"worker id {self.id!r} must be printable, without '/', at most 128 characters"
            )
        _positive("coordinator_timeout", self.coordinator_timeout)
        if self.data is not None and not self.data.is_dir():
            raise ConfigError(f"data directory {self.data} does not exist; create it or fix --data")
        _log_settings(self.log_format, self.log_level)
        _check_security(
            self.insecure, {"curve_key": self.curve_key, "coordinator_key": self.coordinator_key}
        )


def resolve(
    cls: type[C],
    section: str,
    config_file: Path | None,
    flags: dict[str, Any],
    env: dict[str, str] | None = None,
) -> C:
    """Build ``cls`` from the file's ``[section]``, then ``ELASTIC_*`` env, then ``flags``
    (a flag whose value is None was not given)."""
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    if config_file is not None:
        try:
            table = tomllib.loads(Path(config_file).read_text()).get(section, {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config_file}: {exc}; fix or remove --config") from exc
        for key, value in table.items():
            if key not in known:
                raise ConfigError(
                    f"config file {config_file}: [{section}] unknown key {key!r} (known: "
                    f"{', '.join(known)})"
                )
            values[key] = _convert(f"{config_file} [{section}] {key}", known[key].type, value)
    for name, f in known.items():
        var = f"ELASTIC_{name.upper()}"
        if var in env:
            values[name] = _convert(f"environment {var}", f.type, env[var])
    for name, value in flags.items():
        if value is not None and name in known:
            values[name] = _convert(f"--{name.replace('_', '-')}", known[name].type, value)
    obj = cls(**values)
    obj.validate()  # type: ignore[attr-defined]
    return obj


def _convert(where: str, typ: Any, value: Any) -> Any:
    typ = str(typ)
    try:
        if "bool" in typ:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if "Path" in typ:
            return Path(value) if value not in ("", None) else None
        if "float" in typ:
            return float(value)
        if "int" in typ:
            return int(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: {value!r} is not a valid {typ.replace('pathlib.', '')}"
        ) from None


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _check_endpoint(name: str, value: str) -> None:
    if not value.startswith(("tcp://", "ipc://", "inproc://")) or "://" == value[-3:]:
        raise ConfigError(
            f"{name} {value!r} is not a ZeroMQ endpoint; use e.g. tcp://127.0.0.1:5555"
        )


def _check_security(insecure: bool, keys: dict[str, str]) -> None:
    """CURVE needs every key setting; plaintext needs ``insecure`` and none of them."""
    flags = ", ".join(f"--{k.replace('_', '-')}" for k in keys)
    given = [k for k, v in keys.items() if v]
    if insecure and given:
        raise ConfigError(
            f"--insecure with {', '.join(given)}: choose CURVE keys or plaintext, not both"
        )
    if not insecure and len(given) != len(keys):
        missing = ", ".join(f"--{k.replace('_', '-')}" for k, v in keys.items() if not v)
        raise ConfigError(
            f"no CURVE keys ({missing} missing): give {flags} (make keys with `elastic keys "
            "generate`), "
            "or --insecure for plaintext on a network you trust"
        )


def _log_settings(fmt: str, level: str) -> None:
    if fmt not in ("kv", "json"):
        raise ConfigError(f'log_format must be "kv" or "json", got {fmt!r}')
    if level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level must be debug, info, warning or error, got {level!r}")


# What a running daemon takes from a reloaded configuration (SIGHUP); the rest needs a restart.
RELOADABLE = {
    "CoordinatorConfig": {
        "heartbeat_interval",
        "heartbeat_timeout",
        "max_message_bytes",
        "upload_window",
        "upload_part",
        "exit_when_done",
        "log_format",
        "log_level",
    },
    "WorkerConfig": {"coordinator_timeout", "max_message_bytes", "log_format", "log_level"},
}


def apply_reload(current: Any, new: Any) -> tuple[list[str], list[str]]:
    """Copy what may change while running from ``new`` into ``current``.

    Returns (fields applied, fields that changed but need a restart to take effect).
    """
    live = RELOADABLE[type(current).__name__]
    applied, restart = [], []
    for f in fields(current):
        old, value = getattr(current, f.name), getattr(new, f.name)
        if old == value:
            continue
        if f.name in live:
            setattr(current, f.name, value)
            applied.append(f.name)
        else:
            restart.append(f.name)
    return applied, restart


def default_control(bind: str) -> str:
    """The control endpoint beside a data endpoint: TCP port + 1 (a random one when
    the data port is), or the IPC path with ``.control`` appended."""
    scheme, _, rest = bind.partition("://")
    if scheme != "tcp":
        return f"{bind}.control"
    host, _, port = rest.rpartition(":")
    return f"tcp://{host}:{int(port) + 1 if port.isdigit() and int(port) > 0 else 0}"
