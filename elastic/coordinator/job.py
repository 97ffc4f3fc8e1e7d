"""A job on the coordinator: its spec, task, global model, rule, and persisted state."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from elastic.compression.chain import CodecChain, CodecLookup
from elastic.coordinator.checkpoints import CheckpointStore, atomic_write, write_safetensors
from elastic.errors import CheckpointError, Fenced, JobSpecError
from elastic.jobspec import JobSpec
from elastic.plugins import Plugins
from elastic.rules import Aggregator, AsyncAggregator
from elastic.tasks import Task
from elastic.training import evaluate

__all__ = ["Job", "JobState", "codec_chains", "FINAL_STATES", "ENDED_WELL"]

log = logging.getLogger("elastic.job")
CHECKPOINT_FORMAT = 1
MAX_EVENTS = 10_000  # the newest kept
# Rounds kept whole in the history (memory, status.json, checkpoints). Older ones
# are thinned, every other one dropped each time the history reaches twice this:
# a job of a million versions keeps ~2 000 entries, the oldest the sparsest, and
# its plots still span the whole job. Round 1 and the newest rounds always stay.
# Observers (``elastic_round_completed``) and the log see every round.
HISTORY_RECENT = 1_000


class JobState(StrEnum):
    WAITING = "waiting"  # fewer members than min_workers
    RUNNING = "running"
    PAUSED = "paused"  # by the operator: the model and round are kept
    FINISHED = "finished"
    BUDGET_SPENT = "budget_spent"  # the rule's budget (privacy) allows no further round
    FAILED = "failed"
    CANCELLED = "cancelled"  # by the operator: stopped for good, last checkpoint kept


FINAL_STATES = (JobState.FINISHED, JobState.BUDGET_SPENT, JobState.FAILED, JobState.CANCELLED)
ENDED_WELL = (JobState.FINISHED, JobState.BUDGET_SPENT)


def codec_chains(
    spec: JobSpec, aggregator: Aggregator, codecs: CodecLookup
) -> tuple[CodecChain, CodecChain]:
    """The spec's update and model codec chains, parsed (every stage built), and
    checked against the rule."""
    update, model = (
        CodecChain(codecs, spec.compression.update),
        CodecChain(codecs, spec.compression.model),
    )
    if model and isinstance(aggregator, AsyncAggregator):
        raise JobSpecError(
            f"job {spec.id}: [compression] model needs a synchronous rule (every worker at one "
            "version), "
            f"and rule {spec.rule} is asynchronous; drop it, or compress updates only"
        )
    return update, model


def check_fits_rule(spec: JobSpec, aggregator: Aggregator) -> None:
    """What the spec asks that its rule cannot give (``JobSpecError``)."""
    if aggregator.worker_mode == "collective":
        unused = [
            name
            for name, on in (
                ("[job] clients", spec.clients),
                ("[train] stragglers", spec.train.stragglers),
                ("[compression]", spec.compression.update or spec.compression.model),
                ("[train] local_epochs", spec.train.local_epochs != 1),
            )
            if on
        ]
        if unused:
            raise JobSpecError(
                f"job {spec.id}: rule {spec.rule} trains all workers together, gradients "
                f"all-reduced each step with no coordinator in between; it has no use for "
                f"{', '.join(unused)}: drop it, or use fedavg or the fedopt family"
            )
        return
    if not (spec.clients or spec.train.stragglers):
        return
    asked = "[job] clients" if spec.clients else "[train] stragglers"
    if aggregator.worker_mode == "gradient":
        raise JobSpecError(
            f"job {spec.id}: {asked} needs a rule whose clients train locally, and rule "
            f"{spec.rule} takes data-parallel gradient steps (each step splits the data among "
            "the workers there are); use fedavg or the fedopt family, or drop it"
        )
    if spec.clients and isinstance(aggregator, AsyncAggregator):
        raise JobSpecError(
            f"job {spec.id}: [job] clients needs a synchronous rule (clients are sampled per "
            f"round), and rule {spec.rule} is asynchronous; use fedavg or the fedopt family, "
            "or drop clients"
        )


def check_spec(spec: JobSpec, plugins: Plugins) -> None:
    """Refuse a spec whose task or rule is unknown or has bad parameters, or whose
    rule cannot give what it asks (``JobSpecError``, ``PluginError``)."""
    plugins.task(spec.task)(spec.task_params)
    rule, _ = plugins.protected(spec, plugins.rule(spec.rule)(spec.rule_params))
    codec_chains(spec, rule, plugins.codecs)
    check_fits_rule(spec, rule)


class Job:
    """Owns the global model of one job and everything a checkpoint must hold.

    Building a job builds its task and rule from the plugins, so a spec naming an
    unknown plugin or bad parameters fails here, before any worker is involved.
    """

    def __init__(self, spec: JobSpec, plugins: Plugins, state_dir: Path) -> None:
        self.spec = spec
        self.task: Task = plugins.task(spec.task)(spec.task_params)
        # The rule, wrapped by the job's privacy mechanism when it has one.
        self.aggregator: Aggregator
        self.aggregator, self.privacy = plugins.protected(
            spec, plugins.rule(spec.rule)(spec.rule_params)
        )
        # What every update must come through, and what the model goes down through.
        self.update_chain, self.model_chain = codec_chains(spec, self.aggregator, plugins.codecs)
        check_fits_rule(spec, self.aggregator)
        self.model = self.task.build_model(spec.seed)
        self.aggregator.setup(self.model)
        self.store = CheckpointStore(state_dir, spec.id, keep=spec.checkpoint.keep)
        self.state = JobState.WAITING
        self.round = 0  # last committed round
        self.version = 0  # model version; +1 per committed round
        self.history: list[dict[str, Any]] = []
        # Joins, leaves and operator actions, with their time and round (for reports).
        self.events: list[dict[str, Any]] = []
        self.totals: dict[str, Any] = {
            "bytes_sent": 0,
            "bytes_received": 0,
            "updates": 0,
            "rejected": 0,
            "samples_clipped": 0,  # sample counts claimed over the job's bound
        }
        self.final_metrics: dict[str, Any] = {}
        self.started_wall = time.time()
        self.started_at: float | None = None  # when work was first handed out (unix time)
        self._test_data: Dataset | None = None
        self._train_data: Dataset | None = None
        self.resumed_from: int | None = None
        self._resume()

    @property
    def dir(self) -> Path:
        return self.store.dir

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    def evaluate(self) -> dict[str, float]:
        """The global model on the held-out data (``eval_loss`` and the task's
        metrics) and, when the task offers training data, ``global_train_loss``."""
        if self._test_data is None:
            self._test_data = self.task.test_dataset(None)
            self._train_data = self.task.global_train_dataset(None)
        figures = evaluate(self.task, self.model, self._test_data)
        figures |= self.task.derived_metrics(dict(figures))
        if self._train_data is not None:
            on_train = evaluate(self.task, self.model, self._train_data, metrics=False)
            figures["global_train_loss"] = on_train["eval_loss"]
        return figures

    # ------------------------------------------------------------ persistence --

    def checkpoint(self, fence: Callable[[], bool | None] | None = None) -> Path:
        """Write a checkpoint; with ``fence``, only if it says we still lead (else ``Fenced``)."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "job": self.spec.to_dict(),
            "round": self.round,
            "version": self.version,
            "state": str(self.state),
            # Saved from the model's own memory: nothing changes it while torch.save
            # runs (the event loop is here), and a copy would be a model's worth of RSS.
            "model": {k: v.detach() for k, v in self.model.state_dict().items()},
            "aggregator": self.aggregator.state_dict(),
            "history": self.history,
            "events": self.events,
            "totals": self.totals,
            "final_metrics": self.final_metrics,
            "wall_seconds": self.wall_seconds(),
            "started_at": self.started_at,
        }
        return self.store.save(self.round, state, fence)

    def _resume(self) -> None:
        ckpt = self.store.latest()
        if ckpt is None:
            return
        saved = ckpt.get("job", {})
        for key in ("task", "rule"):
            if saved.get(key) != getattr(self.spec, key):
                raise CheckpointError(
                    f"checkpoints in {self.dir} belong to a job with {key} {saved.get(key)!r}, "
                    f"not {getattr(self.spec, key)!r}; give the job another id or use another "
                    "state directory"
                )
        self.model.load_state_dict(ckpt["model"])
        self.aggregator.load_state_dict(ckpt.get("aggregator", {}))
        self.round = int(ckpt["round"])
        self.version = int(ckpt["version"])
        self.history = list(ckpt.get("history", []))
        self.events = list(ckpt.get("events", []))
        self.totals.update(ckpt.get("totals", {}))
        self.final_metrics = dict(ckpt.get("final_metrics", {}))
        self.started_wall = time.time() - float(ckpt.get("wall_seconds", 0.0))
        self.started_at = ckpt.get("started_at")
        if ckpt.get("state") in FINAL_STATES:
            self.state = JobState(ckpt["state"])
        self.resumed_from = self.round
        log.info("resumed job=%s round=%d version=%d", self.spec.id, self.round, self.version)

    def save_final_model(self) -> Path:
        path = self.dir / "final.safetensors"
        tensors = dict(self.model.state_dict())
        atomic_write(
            path,
            lambda f: write_safetensors(
                f, tensors, {"job": self.spec.id, "round": str(self.round)}
            ),
        )
        return path

    def record(self, metrics: dict[str, Any]) -> None:
        """Add a committed round to the history (bounded: ``HISTORY_RECENT``)."""
        self.history.append(metrics)
        if len(self.history) >= 2 * HISTORY_RECENT:
            older = self.history[:-HISTORY_RECENT]
            self.history = older[::2] + self.history[-HISTORY_RECENT:]

    def note(self, event: str, **details: Any) -> None:
        """Record an event (``joined``, ``left``, ``paused``...) at this time and round."""
        self.events.append(
            {"at": round(time.time(), 3), "round": self.round, "event": event, **details}
        )
        del self.events[:-MAX_EVENTS]

    def mark_running(self) -> None:
        if self.state is not JobState.RUNNING:
            self.state = JobState.RUNNING
            if self.started_at is None:
                self.started_at = time.time()

    def wall_seconds(self) -> float:
        return time.time() - self.started_wall

    def status(self, members: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        status = {
            "job": self.spec.id,
            "task": self.spec.task,
            "rule": self.spec.rule,
            "state": str(self.state),
            "round": self.round,
            "rounds": self.spec.rounds,
            "version": self.version,
            "members": members,
            "min_workers": self.spec.min_workers,
            "last": last,
            "final": self.final_metrics,
            "totals": self.totals,
            "wall_seconds": round(self.wall_seconds(), 3),
            "history": self.history,
            "events": self.events,
            "resumed_from": self.resumed_from,
            "started_at": self.started_at,
            "updated_at": time.time(),
        }
        status.update(extra or {})
        return status

    def write_status(self, status: dict[str, Any], holds: Callable[[], bool] | None = None) -> bool:
        """Write ``status.json``; with ``holds``, only while it says we still lead.
        False when not written because of that (worth another try)."""
        # Compact: with ``indent`` json falls back to its pure-Python encoder, and the
        # history makes this file grow with every round.
        data = json.dumps(status, separators=(",", ":")).encode()
        try:
            atomic_write(self.dir / "status.json", lambda f: f.write(data), holds)
        except Fenced:  # another coordinator may lead: its status is the one to keep
            log.debug("status not written job=%s: leadership not held", self.spec.id)
            return False
        except CheckpointError as exc:  # status is informational: never stop a job for it
            log.warning("cannot write status job=%s error=%s", self.spec.id, exc)
        return True
