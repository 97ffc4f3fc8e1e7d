"""What every job engine shares: validating updates, committing model versions, status.

An engine drives one job. It is socket-free: the coordinator gives it members,
updates and the time, and sends the messages it answers with. ``RoundEngine``
(``rounds.py``) runs synchronous rounds; ``AsyncEngine`` (``asynchronous.py``)
folds updates in as they arrive. Both commit through ``_commit``: fence, finalize,
new version, evaluation, checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from elastic.coordinator.job import Job, JobState
from elastic.errors import Fenced, ProtocolError
from elastic.membership.base import Member
from elastic.rules import Update
from elastic.training import move_to_fresh_memory, update_kind, update_template
from elastic.wire.buffers import BufferSet
from elastic.wire.header import Message, MsgType
from elastic.wire.parts import Segment, grid
from elastic.wire.tensors import WireTensor

__all__ = ["Engine", "Outgoing", "Notify"]

log = logging.getLogger("elastic.rounds")
STATUS_EVERY = 0.05  # seconds between status writes while the job's state stays the same (at most 20 a second)
# ... and at least this many times what the last write took: the history makes the
# file grow with every version (16 MB at 100 000), and writing it must not become
# what the coordinator does (at most 1/STATUS_SHARE of its time).
STATUS_SHARE = 20
Notify = Callable[..., None]


@dataclass
class Outgoing:
    """A message to send. ``buffers``: the pooled memory its frames alias; the sender
    attaches its tracker, then releases the set once the batch is out."""

    worker: str
    message: Message
    buffers: BufferSet | None = None


class Engine(ABC):
    """One job's driver. ``notify(hook_name, **kwargs)`` reports events."""

    folds_parts = False  # takes big updates in parts (``on_update_part``)

    def __init__(
        self,
        job: Job,
        notify: Notify,
        clock: Callable[[], float] = time.monotonic,
        fence: Callable[[], bool | None] | None = None,
        holds: Callable[[], bool] | None = None,
        ask: Callable[..., tuple[str, Any] | None] | None = None,
        local: Callable[[str], bool] | None = None,
    ) -> None:
        self.job = job
        self.notify = notify
        self.ask = ask or (lambda *_, **__: None)  # firstresult hooks (elastic_validate_update)
        self._recent: dict[str, deque[float]] = {}  # per worker: when its last updates came
        self.clock = clock
        # Asked before every commit (model version, checkpoint): True to go ahead;
        # False: another coordinator leads, so this engine stops for good; None: not
        # known now (etcd silent), so nothing is committed now.
        self.fence = fence or (lambda: True)
        self.fenced = False
        # Asked (no etcd call) before the status file is written and before new work
        # is handed out: a coordinator that wakes from a stall must neither overwrite
        # the new leader's status nor start work before the loop has asked etcd.
        self.holds = holds or (lambda: True)
        # Whether a worker shares this host's memory (the shared-memory path is on
        # for it); None when the coordinator has that path off.
        self.local = local
        self.mode = job.aggregator.worker_mode
        self.kind = update_kind(self.mode)
        self._template = {k: (tuple(t.shape), t.dtype) for k, t in update_template(job.model, self.mode).items()}
        self._grid: tuple[int, list[list[Segment]]] | None = None  # (part_bytes, the parts) of ``upload_parts``
        self._grid_bytes = 0  # an update's bytes, all its parts together
        self.itemsizes = {name: dtype.itemsize for name, (_, dtype) in self._template.items()}
        self.members_now = 0
        self.paused = False
        self.finishing = False  # the operator asked to finish: the work in progress is the last
        self._status_at = float("-inf")  # when status.json was last written (monotonic)
        self._status_state = ""  # the job state it showed
        self._status_due = False  # something changed since
        self._status_interval = STATUS_EVERY  # the least time between two writes, from the last one's cost
        self._waiting_reported: int | None = None
        self.on_status: Callable[[dict[str, Any]], None] | None = None  # also told every status
        self.generation = 0  # rendezvous generation (data-parallel rules only)
        # WORK frames alias the model's own memory (no copy per round); these are the
        # trackers of those sends. Before the rule writes the model, memory a queued
        # frame still reads is left to it and the model moves to a copy.
        self.model_sends = BufferSet({}, busy=False)

    # ------------------------------------------------------------ interface --

    @abstractmethod
    def tick(self, members: list[Member]) -> list[Outgoing]:
        """Hand out work to the members as the rule wants; enforce deadlines."""

    @abstractmethod
    def on_update(self, worker: str, msg: Message) -> Message:
        """Validate and fold an update; the answer is an ACK or a NACK with the reason."""

    def on_update_part(self, worker: str, msg: Message, segments: list[Segment]) -> Message | None:
        """Validate and fold one part of an update: None while more parts are to
        come, else the ACK or NACK of the update."""
        return self._nack(msg, "bad_part", f"job {self.job.spec.id} takes whole updates only")

    def abandon_parts(self, worker: str) -> None:  # noqa: B027 - only engines that take parts hold any
        """``worker``'s update in parts will not go on (the coordinator refused a part)."""

    @abstractmethod
    def on_worker_failed(self, worker: str, round_: int, detail: str) -> None:
        """A worker said it cannot do the work it was given."""

    @abstractmethod
    def on_member_left(self, worker: str) -> None:
        """A member left: nothing may wait on it."""

    @abstractmethod
    def _abandon_work(self, why: str) -> None:
        """Drop the work in progress and its partial aggregate (the job is cancelled)."""

    def _in_progress(self) -> dict[str, Any]:
        """Extra status fields about the work in progress."""
        return {}

    def close(self) -> None:  # noqa: B027 - most engines hold nothing outside the process
        """The coordinator stops: release what the engine holds outside the process."""

    # -------------------------------------------------------------- control --

    def set_desired(self, state: str) -> None:
        """The operator's wish: ``running``, ``paused`` (work in progress still
        commits; no new work starts), ``finished`` (work in progress commits as the
        last round, or at once with none: the final model is written and the job
        ends as if its rounds were done) or ``cancelled`` (work in progress is
        dropped; the job stops for good and its last checkpoint stays)."""
        job = self.job
        if job.done:
            return
        if state == "cancelled" or (state == "paused") != self.paused and state in ("paused", "running") or state == "finished" and not self.finishing:
            job.note({"cancelled": "cancelled", "paused": "paused", "running": "resumed", "finished": "finishing"}[state])
        if state == "cancelled":
            self._abandon_work("job cancelled")
            job.state = JobState.CANCELLED
            log.info("job cancelled job=%s round=%d version=%d", job.spec.id, job.round, job.version)
            self.notify("elastic_job_finished", job_id=job.spec.id, state=str(job.state), metrics=dict(job.final_metrics))
            self._write_status()
        elif state == "finished":
            if not self.finishing:
                log.info("job finishing job=%s round=%d version=%d: the work in progress is the last", job.spec.id, job.round, job.version)
            self.finishing, self.paused = True, False
        elif state == "paused":
            self.paused = True
        elif state == "running" and self.paused:
            self.paused = False
            job.mark_running()
            log.info("job resumed job=%s round=%d", job.spec.id, job.round)
            self._write_status()
        elif state not in ("running", "paused"):
            log.warning("ignoring unknown desired state job=%s state=%r (running, paused, finished or cancelled)", job.spec.id, state)

    def _pause_if_asked(self, idle: bool) -> bool:
        """True while paused; the job shows as paused once no work is in progress."""
        if not self.paused:
            return False
        if idle and self.job.state is not JobState.PAUSED:
            self.job.state = JobState.PAUSED
            log.info("job paused job=%s round=%d version=%d", self.job.spec.id, self.job.round, self.job.version)
            self._write_status()
        return True

    def _too_few(self, members: list[Member]) -> bool:
        """True (and the job shows as waiting) while fewer than ``min_workers`` are here."""
        job = self.job
        if len(members) >= job.spec.min_workers:
            self._waiting_reported = None
            return False
        if job.state is not JobState.WAITING or self._waiting_reported != len(members):
            job.state = JobState.WAITING
            self._waiting_reported = len(members)
            log.info("waiting for workers job=%s members=%d needed=%d", job.spec.id, len(members), job.spec.min_workers)
            self.notify("elastic_job_waiting", job_id=job.spec.id, members=len(members), needed=job.spec.min_workers)
            self._write_status()
        return True

    def _finish_if_due(self) -> bool:
        """True (and the job finishes) when nothing is in progress and no round is
        left: a checkpoint already holds every round, or the operator asked to finish."""
        job = self.job
        if job.done:
            return True
        if job.round < job.spec.rounds and not self.finishing:
            return False
        last = job.history[-1] if job.history else {}
        job.final_metrics = job.final_metrics or {k: v for k, v in last.items() if k in ("loss", "eval_loss", "accuracy")} | {"rounds": job.round}
        self._finish()
        return True

    # ------------------------------------------------------------- checking --

    def _check_tensors(self, msg: Message) -> tuple[str, str] | None:
        """The update's kind, names, shapes and dtypes against the model's (compressed
        tensors are expanded first: their records are checked the same way)."""
        if msg.meta["kind"] != self.kind:
            return "wrong_kind", f"rule {self.job.spec.rule} needs {self.kind} updates, got {msg.meta['kind']}"
        chain = self.job.update_chain
        if msg.encodings or chain:
            # The parts were checked for NaN/Inf; what they decode to is too, unless
            # every stage keeps finite values finite (a cast up: fp16, bf16).
            recheck = [name for name, records in msg.encodings.items() if name in self._template and not chain.keeps_finite(records, self._template[name][1])]
            try:
                msg.tensors = chain.expand(msg, self._template)
            except ProtocolError as exc:
                return exc.reason, exc.detail
            msg.encodings = {}
            for name in recheck:
                if not msg.tensors[name].is_finite():
                    return "non_finite", f"tensor {name!r} decodes to NaN or Inf"
        if set(msg.tensors) != set(self._template):
            missing = sorted(set(self._template) - set(msg.tensors))[:3]
            extra = sorted(set(msg.tensors) - set(self._template))[:3]
            return "shape_mismatch", f"tensor names differ from the model (missing {missing}, unexpected {extra})"
        for name, (shape, dtype) in self._template.items():
            t = msg.tensors[name]
            if t.shape != shape or not t.dtype.is_floating_point:
                return "shape_mismatch", f"tensor {name!r} is {list(t.shape)} {t.dtype}, the model has {list(shape)} {dtype}"
        if chain and self.kind == "weights":  # through a chain, trained weights travel as their change
            self._add_base_model(msg)
        return None

    def upload_parts(self, part_bytes: int) -> list[list[Segment]] | None:
        """The parts a big update of this job is sent in (``elastic.wire.parts``), or
        None: it comes whole, because the engine or the rule folds whole updates
        only, a norm bound looks at the whole update, or it comes compressed."""
        if not (self.folds_parts and self.job.aggregator.folds_parts) or part_bytes <= 0 or self.job.spec.limits.max_norm or self.job.update_chain:
            return None
        if self._grid is None or self._grid[0] != part_bytes:
            self._grid = (part_bytes, grid(((name, math.prod(shape), dtype.itemsize) for name, (shape, dtype) in self._template.items()), part_bytes))
            self._grid_bytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in self._template.values())
        return self._grid[1]

    def _check_part(self, msg: Message, segments: list[Segment]) -> tuple[str, str] | None:
        """A part's kind, and its tensors against the segments it was granted for."""
        if msg.meta["kind"] != self.kind:
            return "wrong_kind", f"rule {self.job.spec.rule} needs {self.kind} updates, got {msg.meta['kind']}"
        if msg.encodings:
            return "bad_part", "a part of an update must come uncompressed"
        if list(msg.tensors) != [name for name, _, _ in segments]:
            return "bad_part", f"part has tensors {list(msg.tensors)[:3]}, granted {[name for name, _, _ in segments][:3]}"
        for name, start, stop in segments:
            t = msg.tensors[name]
            if t.shape != (stop - start,) or not t.dtype.is_floating_point:
                return "bad_part", f"part of {name!r} is {list(t.shape)} {t.dtype}, granted [{stop - start}] floating point"
        return None

    def _base_weights(self) -> dict[str, torch.Tensor]:
        """The weights workers trained from: the model, which does not change while a round runs."""
        return update_template(self.job.model, self.mode)

    def _add_base_model(self, msg: Message) -> None:
        """A compressed weights update carries trained minus received weights: add
        what the worker received back."""
        weights = self._base_weights()
        for name, wt in msg.tensors.items():
            base = weights[name].detach()
            msg.tensors[name] = WireTensor.from_tensor(wt.to_tensor().to(base.dtype).reshape(base.shape) + base)

    def _screen(self, worker: str, msg: Message, wire_bytes: int) -> tuple[str, str] | None:
        """The job's limits and the plugins' veto, on an update that is well formed.
        With ``norm_action = "clip"`` an update over the norm bound is scaled down to
        it (its tensors replaced) instead of refused."""
        limits = self.job.spec.limits
        reason = self._limit(worker, wire_bytes)
        if reason is not None:
            return reason
        if limits.max_norm:
            reason = self._bound_norm(msg, limits.max_norm, limits.norm_action == "clip")
            if reason is not None:
                return reason
        update = Update(worker, msg.version, int(msg.meta["num_samples"]), float(msg.meta["loss"]), msg.meta["kind"], msg.tensors)
        veto = self.ask("elastic_validate_update", job_id=self.job.spec.id, worker_id=worker, update=update)
        if veto is None:
            return None
        plugin, answer = veto
        return "vetoed", f"validator {plugin} failed: {answer}" if isinstance(answer, Exception) else f"{plugin}: {answer}"

    def _limit(self, worker: str, wire_bytes: int) -> tuple[str, str] | None:
        """The job's rate and size limits on an update of ``wire_bytes``."""
        limits, now = self.job.spec.limits, self.clock()
        if limits.max_updates_per_minute:
            recent = self._recent.setdefault(worker, deque())
            while recent and now - recent[0] > 60.0:
                recent.popleft()
            if len(recent) >= limits.max_updates_per_minute:
                return "rate_limited", f"more than {limits.max_updates_per_minute} updates in a minute from {worker}"
            recent.append(now)
        if limits.max_update_bytes and wire_bytes > limits.max_update_bytes:
            return "too_large", f"update of {wire_bytes} bytes, the job allows {limits.max_update_bytes}"
        return None

    def _bound_norm(self, msg: Message, bound: float, clip: bool) -> tuple[str, str] | None:
        """The L2 norm of the update's change (trained minus sent weights, or the
        gradient or delta itself), refused or clipped when over ``bound``."""
        relative = self.kind == "weights"
        base = self._base_weights() if relative else {}
        changes = {}
        total = 0.0
        for name, wt in msg.tensors.items():
            t = wt.to_tensor()
            change = t.to(torch.float32) - base[name].detach().reshape(t.shape).to(torch.float32) if relative else t.to(torch.float32)
            changes[name] = change
            total += float(change.pow(2).sum())
        norm = math.sqrt(total)
        if norm <= bound:
            return None
        if not clip:
            return "norm_too_large", f"the update's L2 norm is {norm:.4g}, the job allows {bound:.4g}"
        scale = bound / norm
        for name, change in changes.items():
            t = msg.tensors[name].to_tensor()
            scaled = change.mul_(scale) + (base[name].detach().reshape(t.shape).to(torch.float32) if relative else 0)
            msg.tensors[name] = WireTensor.from_tensor(scaled.to(t.dtype))
        log.info("update clipped job=%s sender=%s norm=%.4g bound=%.4g", self.job.spec.id, msg.sender, norm, bound)
        return None

    def _work_meta(self, shard: list[int]) -> dict[str, Any]:
        """The ``meta`` of a WORK message: what to compute, on which shard, and how to
        send it back."""
        spec = self.job.spec
        meta = {"mode": self.mode, "task": spec.task, "task_params": spec.task_params, "train": asdict(spec.train), "shard": shard, "seed": spec.seed}
        if self.job.update_chain:
            meta["codecs"] = list(self.job.update_chain.stages)
        return meta

    def _count_update(self, wire_bytes: int, raw_bytes: int) -> None:
        """An update was folded: its bytes as sent and as decoded (the compression ratio)."""
        totals = self.job.totals
        totals["update_bytes_wire"] = totals.get("update_bytes_wire", 0) + wire_bytes
        totals["update_bytes_raw"] = totals.get("update_bytes_raw", 0) + raw_bytes

    def _nack(self, msg: Message, reason: str, detail: str) -> Message:
        self.job.totals["rejected"] += 1
        log.warning("update rejected job=%s sender=%s reason=%s detail=%s", self.job.spec.id, msg.sender, reason, detail)
        self.notify("elastic_update_rejected", job_id=self.job.spec.id, worker_id=msg.sender, reason=reason, detail=detail)
        return Message(MsgType.NACK, job=msg.job, round=msg.round, version=msg.version, key=msg.key, meta={"reason": reason, "detail": detail})

    # ------------------------------------------------------------ committing --

    def _commit(self, number: int, metrics: dict[str, Any]) -> bool | None:
        """Write the rule's aggregate into the model as version + 1, unless fenced.

        ``number`` is the round (or, for asynchronous rules, the version) committed;
        ``metrics`` its figures. Evaluates, records history, checkpoints, and
        finishes the job after its last round. Returns the fence's verdict: True
        (committed), False (another coordinator leads; this engine stops) or None
        (leadership unconfirmed); on anything but True the rule's aggregate is
        untouched, for the caller to drop or keep.
        """
        job, spec = self.job, self.job.spec
        verdict = self._still_ours()
        if verdict is not True:
            self.fenced = verdict is False
            reason = "another coordinator leads" if self.fenced else "leadership not confirmed (etcd silent)"
            log.warning("round not committed job=%s round=%d reason=%s", spec.id, number, reason)
            self.notify("elastic_round_abandoned", job_id=spec.id, round=number, reason=reason)
            return verdict
        if not self.model_sends.free:  # e.g. a frozen straggler has not read its WORK
            log.debug("model memory still being sent job=%s round=%d: moving the model to a copy", spec.id, number)
            move_to_fresh_memory(job.model)
            self.model_sends = BufferSet({}, busy=False)
        job.aggregator.finalize()
        job.round, job.version = number, job.version + 1
        metrics = {"round": number, "version": job.version, **metrics, "members": self.members_now, "at": round(time.time(), 3)}
        last = number >= spec.rounds or self.finishing
        if last or (spec.eval_every and number % spec.eval_every == 0):
            metrics.update(job.evaluate())
        job.record(metrics)
        if last:
            job.state = JobState.FINISHED
            job.final_metrics = {k: v for k, v in metrics.items() if k in ("loss", "eval_loss", "accuracy")} | {"rounds": job.round}
        if last or number % spec.checkpoint.every == 0:
            try:
                started = time.perf_counter()
                path = job.checkpoint(self._still_ours)
                self.notify("elastic_checkpoint_saved", job_id=spec.id, round=number, path=str(path), seconds=time.perf_counter() - started)
            except Fenced as exc:  # leadership unsure between the fence and the publish
                log.error("checkpoint not published job=%s round=%d: %s", spec.id, number, exc)
                if self.fence() is False:  # another leader: stop here, publish nothing more
                    self.fenced = True
                    return True
                # else etcd is only silent: the next checkpoint will carry this version
        loss = metrics.get("loss", float("nan"))
        log.info("round committed job=%s round=%d version=%d updates=%d loss=%.4f%s", spec.id, number, job.version, metrics.get("updates", 0), loss, "".join(f" {k}={metrics[k]:.4f}" for k in ("eval_loss", "accuracy") if k in metrics))
        self.notify("elastic_round_completed", job_id=spec.id, round=number, version=job.version, metrics=metrics)
        if last:
            self._finish()
        else:
            self._write_status()
        return True

    def _still_ours(self) -> bool | None:
        """The fence, then the lease by the local clock. A process stopped right after
        etcd said yes (SIGSTOP, a stalled VM) may wake past its lease while a new
        leader writes the same checkpoint: asked after the etcd call, the clock leaves
        no gap but the rename itself. None (unsure) when only the clock says no."""
        verdict = self.fence()
        if verdict is True and not self.holds():
            return None
        return verdict

    def _finish(self) -> None:
        job = self.job
        job.state = JobState.FINISHED
        path = job.save_final_model()
        final = job.final_metrics | {"model": str(path), "wall_seconds": round(job.wall_seconds(), 3)}
        log.info("job finished job=%s rounds=%d %s", job.spec.id, job.round, " ".join(f"{k}={v}" for k, v in final.items()))
        self.notify("elastic_job_finished", job_id=job.spec.id, state=str(job.state), metrics=final)
        self._write_status()

    def status(self) -> dict[str, Any]:
        """The job's status, with the work in progress."""
        return self.job.status(self.members_now, self._in_progress())

    def _write_status(self) -> None:
        """Publish the status: at once when the job's state changed, else at most every
        ``STATUS_EVERY`` seconds (``flush_status`` writes what was held back). An
        asynchronous job commits thousands of versions a second; its status file must
        not be rewritten, nor etcd written, for each."""
        now = time.monotonic()
        if str(self.job.state) == self._status_state and now - self._status_at < self._status_interval:
            self._status_due = True
            return
        self._status_at, self._status_state, self._status_due = now, str(self.job.state), False
        status = self.status()
        if not self.job.write_status(status, self.holds):
            self._status_due = True  # tried again by ``flush_status``
        if self.on_status is not None:
            self.on_status(status)
        self._status_interval = max(STATUS_EVERY, STATUS_SHARE * (time.monotonic() - now))

    def flush_status(self) -> None:
        """Write the status held back by ``_write_status``, once its interval is over."""
        if self._status_due and time.monotonic() - self._status_at >= self._status_interval:
            self._write_status()
