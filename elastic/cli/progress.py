"""The live progress bar of ``elastic run``: a plugin observing the coordinator's events."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from elastic.hookspecs import hookimpl

__all__ = ["ProgressObserver"]


class ProgressObserver:
    """Shows round, members, loss and accuracy as the job runs."""

    def __init__(
        self, job_id: str, rounds: int, console: Console | None = None, enabled: bool = True
    ) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.members = 0
        self.finished: dict[str, Any] | None = None
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.progress.add_task(job_id, total=rounds, status="starting")

    def __enter__(self) -> ProgressObserver:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _status(self, text: str, completed: int | None = None) -> None:
        kwargs: dict[str, Any] = {"status": text}
        if completed is not None:
            kwargs["completed"] = completed
        self.progress.update(self.task, **kwargs)

    @hookimpl
    def elastic_worker_joined(self) -> None:
        self.members += 1

    @hookimpl
    def elastic_worker_left(self, worker_id: str, reason: str) -> None:
        self.members = max(0, self.members - 1)
        if self.enabled:
            self.console.log(f"worker {worker_id} left: {reason}")

    @hookimpl
    def elastic_job_waiting(self, members: int, needed: int) -> None:
        self._status(f"waiting for workers ({members}/{needed})")

    @hookimpl
    def elastic_round_started(self, round: int, participants: list[str]) -> None:
        self._status(f"round {round}: {len(participants)} training, members {self.members}")

    @hookimpl
    def elastic_round_completed(self, round: int, metrics: dict[str, Any]) -> None:
        parts = [f"members {metrics['members']}", f"loss {metrics['loss']:.4f}"]
        if "accuracy" in metrics:
            parts.append(f"acc {metrics['accuracy']:.4f}")
        elif "eval_loss" in metrics:
            parts.append(f"eval_loss {metrics['eval_loss']:.4g}")
        self._status(" ".join(parts), completed=round)

    @hookimpl
    def elastic_round_abandoned(self, round: int, reason: str) -> None:
        if self.enabled:
            self.console.log(f"round {round} will run again: {reason}")

    @hookimpl
    def elastic_job_finished(self, state: str, metrics: dict[str, Any]) -> None:
        self.finished = {"state": state, **metrics}
