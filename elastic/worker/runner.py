"""Runs one unit of work: intake (the job's model and data, the received model
loaded), compute (the executor the WORK's mode asks for: ``executors.py``), packing
(the UPDATE that carries the result)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from elastic.errors import Cancelled, ElasticError
from elastic.plugins import Plugins
from elastic.training import update_kind
from elastic.wire.header import Message, MsgType
from elastic.worker.executors import EXECUTORS, WorkExecutor
from elastic.worker.intake import Intake, JobContext, Placer
from elastic.worker.packing import Packer, Result

__all__ = ["TaskRunner", "Result"]

log = logging.getLogger("elastic.worker.runner")


class TaskRunner:
    """A worker's work, one WORK at a time: ``run(work)`` is its UPDATE or a NACK."""

    def __init__(
        self,
        plugins: Plugins,
        device: torch.device,
        data_dir: Path | None,
        worker_id: str,
        cancel: threading.Event | None = None,
    ) -> None:
        self.device = device
        self.worker_id = worker_id
        self.intake = Intake(plugins, device, data_dir)
        self.packer = Packer(plugins.codecs, device, worker_id)
        self.executors: dict[str, WorkExecutor] = {}
        for kind in EXECUTORS:
            executor = kind(device, cancel)
            self.executors.update({mode: executor for mode in kind.modes})

    @property
    def placer(self) -> Placer | None:
        """On the coordinator's host: room in the shared-memory segment the next
        update goes through (``SegmentWriter.place``), else None."""
        return self.intake.placer

    @placer.setter
    def placer(self, placer: Placer | None) -> None:
        self.intake.placer = self.packer.placer = placer

    @property
    def jobs(self) -> dict[str, JobContext]:
        return self.intake.jobs

    def run(self, work: Message) -> Result:
        """The UPDATE for a WORK message, or a NACK saying why the work cannot be done."""
        try:
            return self._run(work)
        except Cancelled as exc:
            return self._nack(work, "cancelled", str(exc))
        except ElasticError as exc:
            return self._nack(work, "work_failed", str(exc))
        except Exception as exc:  # a task's bug is reported to the coordinator, not fatal here
            log.exception("work failed job=%s round=%d", work.job, work.round)
            return self._nack(work, "work_failed", f"{type(exc).__name__}: {exc}")

    def _run(self, work: Message) -> Result:
        mode = work.meta["mode"]
        executor = self.executors.get(mode)
        if executor is None:
            raise ElasticError(
                f"unknown work mode {mode!r}; this worker knows {', '.join(sorted(self.executors))}"
            )
        ctx = self.intake.take(work)
        if isinstance(ctx, tuple):
            return self._nack(work, *ctx)
        computed = executor.compute(ctx, work, relative=bool(self.packer.chain(ctx, work)))
        if isinstance(computed, tuple):
            return self._nack(work, *computed)
        meta = {
            "num_samples": computed.num_samples,
            "loss": computed.loss,
            "kind": update_kind(mode),
            "train_seconds": computed.seconds,
        }
        return self.packer.pack(ctx, work, computed.update, meta, computed.from_parameters)

    def _nack(self, work: Message, reason: str, detail: str) -> Result:
        log.warning(
            "cannot do work job=%s round=%d reason=%s detail=%s",
            work.job,
            work.round,
            reason,
            detail,
        )
        return Result(
            Message(
                MsgType.NACK,
                job=work.job,
                round=work.round,
                version=work.version,
                sender=self.worker_id,
                key=work.key,
                meta={"reason": reason, "detail": detail},
            )
        )
