"""The typed error hierarchy.

Every error a user can cause ends as one of these, with a message that names the
thing at fault and the fix. The CLI prints that one line (a traceback only with
``--debug``); daemons log it and keep serving everyone else.
"""

from __future__ import annotations

__all__ = [
    "ElasticError",
    "ConfigError",
    "JobSpecError",
    "ProtocolError",
    "PluginError",
    "CodecError",
    "MembershipUnavailable",
    "CheckpointError",
    "ControlError",
    "Unreachable",
]


class ElasticError(Exception):
    """Base class of every error elastic raises on purpose."""

    exit_code = 2  # what the CLI exits with


class ConfigError(ElasticError):
    """A daemon setting (flag, environment variable, config file) is invalid."""


class JobSpecError(ConfigError):
    """A job spec is invalid; the message names the key and the fix."""


class ProtocolError(ElasticError):
    """A message broke the wire protocol. ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class PluginError(ElasticError):
    """A plugin failed to load, clashed with another, or was asked for by an unknown name."""


class CodecError(ElasticError):
    """A codec could not encode or decode a tensor."""


class MembershipUnavailable(ElasticError):
    """The cluster backend (etcd, ZooKeeper...) cannot be reached."""


class CheckpointError(ElasticError):
    """A checkpoint could not be written or read."""


class Cancelled(ElasticError):
    """Work stopped part-way because the daemon is shutting down."""


class Fenced(ElasticError):
    """A commit was refused because this coordinator no longer leads."""


class ControlError(ElasticError):
    """A control request failed. ``code``: ``no_such_job`` (CLI exit 4),
    ``invalid_job`` / ``bad_request`` (2), anything else (1)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.exit_code = {"no_such_job": 4, "invalid_job": 2, "bad_request": 2}.get(code, 1)
        super().__init__(message)


class Unreachable(ElasticError):
    """No coordinator answered (CLI exit 3)."""

    exit_code = 3
