"""What an engine is given by whoever drives it (the coordinator core, a test, a
benchmark): one object instead of a handful of callables."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EngineContext", "HostedStore", "Notify"]

Notify = Callable[..., None]


def _ignore(*_args: Any, **_kwargs: Any) -> None:
    return None


def _yes() -> bool:
    return True


@dataclass
class EngineContext:
    """An engine's view of the world around its job.

    Attributes:
        notify: reports an event to the observers (``notify(hook_name, **kwargs)``).
        clock: monotonic seconds (a simulation gives its own).
        fence: asked before every commit (model version, checkpoint): True to go
            ahead; False: another coordinator leads, so the engine stops for good;
            None: not known now (the backend silent), so nothing is committed now.
        holds: asked with no backend call before a status write and before new work
            is handed out: a coordinator that wakes from a stall must neither
            overwrite the new leader's status nor start work before it asked.
        ask: a ``firstresult`` hook's first answer, ``(plugin, answer)`` or None
            (``elastic_validate_update``).
        local: whether a worker shares this host's memory; None when the
            coordinator has the shared-memory path off.
        on_status: also told every status written (the job store's copy).
        collective_store: where a collective job's members meet
            (``elastic.distributed.stores``): ``cluster``, or ``coordinator:PORT``
            for a store this process hosts (the default, started on first use).
    """

    notify: Notify = _ignore
    clock: Callable[[], float] = time.monotonic
    fence: Callable[[], bool | None] = _yes
    holds: Callable[[], bool] = _yes
    ask: Callable[..., tuple[str, Any] | None] = field(default=lambda *_a, **_k: None)
    local: Callable[[str], bool] | None = None
    on_status: Callable[[dict[str, Any]], None] | None = None
    collective_store: Callable[[], str] = field(default_factory=lambda: HostedStore("127.0.0.1"))


class HostedStore:
    """A TCPStore this process hosts for collective jobs, started on first use; the
    WORK names it ``coordinator:PORT`` (workers reach it at the coordinator's host)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._store: Any = None

    def __call__(self) -> str:
        if self._store is None:
            from elastic.distributed.stores import host_store  # noqa: PLC0415

            self._store = host_store(self.host)
        return f"coordinator:{self._store.port}"
