"""Runs one WORK: intake (the job's model and data, the received model loaded),
compute (the executor the WORK's mode asks for: ``executors.py``), packing (the
UPDATE that carries the result). A WORK for virtual clients is run once per client,
each from the same received model, on its own shard, its update under its own key."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from elastic.errors import Cancelled, ElasticError
from elastic.plugins import Plugins
from elastic.training import update_kind
from elastic.wire.header import Message, MsgType
from elastic.worker.collective import CollectiveTraining, StoreOpener
from elastic.worker.exchanges import Exchanges
from elastic.worker.executors import EXECUTORS, WorkExecutor
from elastic.worker.intake import Intake, JobContext, Placer, keep_newest
from elastic.worker.packing import Packer, Result

__all__ = ["TaskRunner", "Result", "client_works"]

log = logging.getLogger("elastic.worker.runner")

# Virtual clients' codec state (error-feedback residuals) kept per job, the newest
# used first: a client that comes back after dropping out starts with none.
CLIENT_STATES = 64


def client_works(work: Message) -> list[Message]:
    """The WORK as its units: itself, or with virtual clients one WORK per client
    (its shard, its local epochs, its key, ``client``), sharing the model's frames; a
    straggler's local epochs (``epochs``) in place of the job's."""
    clients = work.meta.get("clients")
    train = dict(work.meta["train"])
    if clients is None:
        if "epochs" in work.meta:
            train["local_epochs"] = work.meta["epochs"]
            return [dataclasses.replace(work, meta={**work.meta, "train": train})]
        return [work]
    count = int(work.meta["shard"][1])
    units = []
    for entry in clients:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not all(type(x) is int for x in entry)
            or not 0 <= entry[0] < count
            or entry[1] < 1
        ):
            raise ElasticError(f"bad clients entry {entry!r}: [client, epochs] expected")
        client, epochs = entry
        meta = {k: v for k, v in work.meta.items() if k != "clients"}
        # (``client`` marks the unit; units never go on the wire)
        meta |= {
            "shard": [client, count],
            "train": train | {"local_epochs": epochs},
            "client": client,
        }
        units.append(dataclasses.replace(work, meta=meta, key=f"{work.key}/{client}"))
    return units


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
        self.privacy = plugins.privacy  # the mechanisms a job's WORK may name
        # Set by the daemon: the line to a job's rule within a round (EXCHANGE), for
        # interactive privacy mechanisms; None in a simulation.
        self.exchanges: Exchanges | None = None
        self.intake = Intake(plugins, device, data_dir)
        self.packer = Packer(plugins.codecs, device, worker_id)
        self.executors: dict[str, WorkExecutor] = {}
        for kind in EXECUTORS:
            executor = kind(device, cancel)
            self.executors.update({mode: executor for mode in kind.modes})
        self.collective = CollectiveTraining(device, worker_id, self._open_store)
        # Set by the daemon: whether a newer WORK of the job waits (a collective
        # generation then ends at the next step all its ranks agree on), and how to
        # reach a collective job's store.
        self.superseded: Callable[[str], bool] = lambda job: False
        self.open_store: StoreOpener | None = None

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

    def prepare(self, job: Mapping[str, Any]) -> None:
        """Build a job's task, model and data before its work comes (a WELCOME's
        ``jobs`` entry): the first round then waits for training only. A job that
        cannot be built is logged; its WORK will answer with the error."""
        try:
            what = Message(
                MsgType.WORK,
                job=str(job["job"]),
                meta={
                    "task": str(job["task"]),
                    "task_params": dict(job["task_params"]),
                    "seed": int(job["seed"]),
                    "shard": [int(job["shard"][0]), int(job["shard"][1])],
                },
            )
            started = time.perf_counter()
            self.intake.prepare(what)
            log.info("job prepared job=%s seconds=%.2f", what.job, time.perf_counter() - started)
        except Exception as exc:  # (bad entries too: the coordinator's, but checked here)
            log.warning("cannot prepare job=%s: %s: %s", job.get("job"), type(exc).__name__, exc)

    def run(self, work: Message) -> Result:
        """The one UPDATE (or NACK) of a WORK without virtual clients."""
        if "clients" in work.meta:
            raise ElasticError("a WORK for virtual clients has an update each: use results()")
        return next(self.results(work))

    def results(self, work: Message) -> Iterator[Result]:
        """The UPDATE for a WORK message, or a NACK saying why the work cannot be
        done; with virtual clients, one for each client, as each is trained."""
        mode = work.meta["mode"]
        if mode in self.collective.modes:
            yield from self._collective(work)
            return
        executor = self.executors.get(mode)
        try:
            if executor is None:
                raise ElasticError(
                    f"unknown work mode {mode!r}; this worker knows "
                    f"{', '.join(sorted([*self.executors, *self.collective.modes]))}"
                )
            units = client_works(work)
        except ElasticError as exc:
            yield self._nack(work, "work_failed", str(exc))
            return
        start: dict[str, torch.Tensor] | None = None  # the received model, for the next client
        for i, unit in enumerate(units):
            try:
                if i == 0:
                    taken = self.intake.take(unit)
                    if isinstance(taken, tuple):
                        yield self._nack(work, *taken)  # no client of this WORK can train
                        return
                    ctx = taken
                    if len(units) > 1:
                        start = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
                else:
                    ctx = self.intake.jobs[work.job]
                    assert start is not None
                    self.intake.again(ctx, unit, start)
                yield self._run(ctx, unit, executor)
            except Cancelled as exc:
                yield self._nack(unit, "cancelled", str(exc))
                return
            except ElasticError as exc:
                yield self._nack(unit, "work_failed", str(exc))
            except Exception as exc:  # a task's bug is reported to the coordinator, not fatal
                log.exception("work failed job=%s round=%d", unit.job, unit.round)
                yield self._nack(unit, "work_failed", f"{type(exc).__name__}: {exc}")

    def _collective(self, work: Message) -> Iterator[Result]:
        """A collective generation's reports; a NACK if this worker cannot take part."""
        try:
            ctx = self.intake.prepare(work)
            yield from self.collective.session(ctx, work, lambda: self.superseded(work.job))
        except Cancelled as exc:
            yield self._nack(work, "cancelled", str(exc))
        except ElasticError as exc:
            yield self._nack(work, "work_failed", str(exc))
        except Exception as exc:  # a task's bug is reported to the coordinator, not fatal
            log.exception("collective work failed job=%s", work.job)
            yield self._nack(work, "work_failed", f"{type(exc).__name__}: {exc}")

    def _open_store(self, spec: str, job: str) -> Any:
        if self.open_store is None:
            raise ElasticError("this worker cannot reach a collective store")
        return self.open_store(spec, job)

    def _run(self, ctx: JobContext, work: Message, executor: WorkExecutor) -> Result:
        client = work.meta.get("client")
        if client is not None:  # its own codec state
            ctx.compressor = ctx.client_states.pop(client, None)
        chained = bool(self.packer.chain(ctx, work))
        privacy = work.meta.get("privacy")
        mechanism = self.privacy.get(str(privacy["mechanism"])) if privacy else None
        # (a privacy step works on the change, so trained weights are computed as one)
        computed = executor.compute(ctx, work, relative=chained or mechanism is not None)
        if isinstance(computed, tuple):
            return self._nack(work, *computed)
        meta = {
            "num_samples": computed.num_samples,
            "loss": computed.loss,
            "kind": update_kind(work.meta["mode"]),
            "train_seconds": computed.seconds,
            **({"metrics": computed.metrics} if computed.metrics else {}),
            **({"data_size": size} if (size := _data_size(ctx.dataset)) else {}),
        }
        if mechanism is not None:
            assert privacy is not None
            channel = None
            if mechanism.interactive:
                if self.exchanges is None:
                    raise ElasticError(
                        f"privacy mechanism {mechanism.name} talks with the coordinator: "
                        "run the job with worker daemons (elastic run --local-workers N)"
                    )
                channel = self.exchanges.channel(self.worker_id, work)
            given = dict(computed.update)
            said = mechanism.protect(privacy, computed.update, channel)
            # What the data would say beyond the protected update (a sample count, a
            # loss) may be withheld by the mechanism: it says what to send instead.
            withheld: dict[str, Any] = {
                k: said.pop(k) for k in ("num_samples", "loss") if k in said
            }
            if withheld:
                meta.update(withheld)
                meta.pop("metrics", None)  # (a task's own figures are the data's too)
                meta.pop("data_size", None)  # (and so is how much of it there is)
            if said:
                meta["privacy"] = said
            # (tensors of the mechanism's own, in the rule's wire form, go as they are)
            replaced = computed.update.keys() != given.keys() or any(
                computed.update[k] is not t for k, t in given.items()
            )
            if not chained and not replaced and meta["kind"] == "weights":  # as weights: add back
                with torch.no_grad():
                    for name, t in computed.update.items():
                        t.add_(ctx.received[name])
        if client is not None:
            meta["client"] = client
        result = self.packer.pack(ctx, work, computed.update, meta, computed.from_parameters)
        if client is not None and ctx.compressor is not None:
            keep_newest(ctx.client_states, client, ctx.compressor, CLIENT_STATES)
        return result

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


def _data_size(dataset: object) -> int | None:
    """How many samples ``dataset`` holds, sent with each update so the coordinator
    can bound the sample count claimed; None for a dataset without a length."""
    try:
        return int(len(dataset))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
