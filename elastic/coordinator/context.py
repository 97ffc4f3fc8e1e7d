"""What an engine is given by whoever drives it (the coordinator core, a test, a
benchmark): one object instead of a handful of callables."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EngineContext", "Notify"]

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
    """

    notify: Notify = _ignore
    clock: Callable[[], float] = time.monotonic
    fence: Callable[[], bool | None] = _yes
    holds: Callable[[], bool] = _yes
    ask: Callable[..., tuple[str, Any] | None] = field(default=lambda *_a, **_k: None)
    local: Callable[[str], bool] | None = None
    on_status: Callable[[dict[str, Any]], None] | None = None
