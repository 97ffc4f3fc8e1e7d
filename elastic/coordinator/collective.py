"""The engine of a collective rule: the rendezvous, not the data path.

Workers of a collective job (``elastic.rules.CollectiveRule``) all-reduce their
gradients among themselves (``elastic.worker.collective``). This engine decides who
trains together: each set of members is a *generation*, ranked survivors first in
their old order (so the lowest surviving rank is rank 0), then joiners. It starts a
new generation, and sends each member its WORK at once, when

- a member joins (the others stop after a step they agree on, in their process);
- a member leaves or dies (lease, heartbeats, or its peers' collectives failing);
- the running generation reports itself broken: it waits ``BROKEN_GRACE`` for every
  rank's report (a dead peer breaks every rank's collective within milliseconds),
  then goes on with those that reported; a silent one joins again once it reports.

The model goes down only when no member of the new generation holds training
state (the first generation, or after every worker died): then the coordinator's
newest checkpoint, with the optimizer's state and the position in the data, is the
state. Rank 0's checkpoints (every ``checkpoint_every`` steps) are committed like
rounds, fenced and written atomically; a job's ``rounds`` are its steps.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from elastic.coordinator.context import EngineContext
from elastic.coordinator.engine import Engine, Outgoing
from elastic.coordinator.job import Job, JobState
from elastic.coordinator.validation import Refusal
from elastic.membership.base import Member
from elastic.rules import CollectiveRule
from elastic.wire.header import Message, MsgType
from elastic.wire.tensors import WireTensor

__all__ = ["CollectiveEngine", "BROKEN_GRACE"]

log = logging.getLogger("elastic.rounds")
BROKEN_GRACE = 0.3  # seconds a broken generation waits for all its ranks to report
ENDS = ("progress", "checkpoint", "stopped", "broken", "done")


class CollectiveEngine(Engine):
    """Generations of a collective job (``CollectiveRule``)."""

    def __init__(self, job: Job, ctx: EngineContext | None = None) -> None:
        super().__init__(job, ctx)
        if not isinstance(job.aggregator, CollectiveRule):
            raise TypeError(f"rule {job.spec.rule} is not a collective rule")
        self.rule: CollectiveRule = job.aggregator
        self.ranks: list[str] = []  # the running generation, in rank order
        self.holders: dict[str, int] = {}  # members holding training state: at which step
        self.reported: set[str] = set()  # ranks of the running generation that reported its end
        self.broken_at: float | None = None
        self.silent: set[str] = set()  # left out of a broken generation's successor
        self.refused: set[str] = set()  # cannot run the job's work (their NACK said why)
        self.committed = job.round  # the step of the newest checkpoint

    # ------------------------------------------------------------ generations --

    def tick(self, members: list[Member]) -> list[Outgoing]:
        job = self.job
        self.members_now = len(members)
        if job.done or self.fenced or not self.ctx.holds():
            return []
        now = self.clock()
        here = [m.id for m in members if m.id not in self.refused]
        if self._too_few(members) and not self.ranks:
            return []
        if not self._due(here, now):
            return []
        chosen = [w for w in self.ranks if w in here and w not in self.silent]
        chosen += [w for w in here if w not in chosen and w not in self.silent]
        if job.spec.max_workers:
            chosen = chosen[: job.spec.max_workers]
        if len(chosen) < job.spec.min_workers:
            self.ranks = []  # the running generation is over; wait for enough members
            self._too_few([m for m in members if m.id in chosen])
            return []
        return self._start(chosen)

    def _due(self, here: list[str], now: float) -> bool:
        """Whether the running generation must give way to a new one."""
        if not self.ranks:
            return True
        if any(w not in here for w in self.ranks):
            return True  # a member left or died
        if self.broken_at is not None:
            waited = now - self.broken_at
            if len(self.reported) < len(self.ranks) and waited < BROKEN_GRACE:
                return False
            self.silent = set(self.ranks) - self.reported
            return True
        limit = self.job.spec.max_workers or math.inf
        return (
            any(w not in self.ranks and w not in self.silent for w in here)
            and len(self.ranks) < limit
        )

    def _start(self, chosen: list[str]) -> list[Outgoing]:
        job, spec = self.job, self.job.spec
        self.generation += 1
        self.ranks, self.reported, self.broken_at = chosen, set(), None
        carry = not any(w in self.holders for w in chosen)
        store = self.ctx.collective_store()
        tensors: dict[str, WireTensor] = {}
        if carry:  # nobody holds the state: the newest checkpoint is it
            job.round = self.rule.position["step"]  # steps after it are done again
            state = {k: v.detach() for k, v in job.model.state_dict().items()}
            state |= self.rule.optimizer_state
            tensors = {k: WireTensor.from_tensor(v) for k, v in state.items()}
        if job.state is not JobState.RUNNING:
            job.mark_running()
        log.info(
            "new generation job=%s generation=%d members=%s step=%d state_from=%s",
            spec.id,
            self.generation,
            ",".join(chosen),
            job.round,
            "checkpoint" if carry else "rank 0",
        )
        job.note("generation", generation=self.generation, world=len(chosen), step=job.round)
        out = []
        for rank, worker in enumerate(chosen):
            msg = self._work(worker, self.generation, [0, 1], tensors)
            collective: dict[str, Any] = {
                "generation": self.generation,
                "rank": rank,
                "world": len(chosen),
                "store": store,
                "steps": spec.rounds,
                "settings": self.rule.settings(),
            }
            if carry:
                collective["layout"] = self.rule.optimizer_layout
                collective["position"] = dict(self.rule.position)
            msg.meta["collective"] = collective
            out.append(Outgoing(worker, msg, self.committer.model_sends if carry else None))
        self.publisher.write()
        return out

    # ---------------------------------------------------------------- reports --

    def on_update(self, worker: str, msg: Message) -> Message:
        report = msg.meta.get("collective")
        refusal = self._check(worker, msg, report)
        if refusal is not None:
            return self._nack(msg, refusal)
        assert isinstance(report, dict)
        generation, step, end = report["generation"], report["step"], report["end"]
        if report.get("holds"):
            self.holders[worker] = step
        else:
            self.holders.pop(worker, None)
        self.silent.discard(worker)  # it answers: it may take part again
        current = generation == self.generation and worker in self.ranks
        if current and end in ("stopped", "broken", "done"):
            self.reported.add(worker)
            if end == "broken" and self.broken_at is None:
                self.broken_at = self.clock()
                log.warning(
                    "generation broken job=%s generation=%d worker=%s detail=%s",
                    self.job.spec.id,
                    generation,
                    worker,
                    report.get("detail", ""),
                )
        if current and self.ranks.index(worker) == 0 and step > self.job.round:
            self.job.round = step  # progress, shown in the status
        if msg.tensors and step > self.committed and not self.job.done:
            self._commit_checkpoint(msg, report)
        elif end == "progress":
            self.publisher.write()
        return Message(MsgType.ACK, job=msg.job, round=msg.round, version=msg.version, key=msg.key)

    def _check(self, worker: str, msg: Message, report: Any) -> Refusal | None:
        """A report's claims against what this engine handed out and what it can bound."""
        if not isinstance(report, dict) or report.get("end") not in ENDS:
            return Refusal("bad_report", f"a collective report needs collective.end in {ENDS}")
        for key in ("generation", "step", "epoch", "offset"):
            if type(report.get(key)) is not int or report[key] < 0:
                return Refusal("bad_report", f"collective.{key} must be an int >= 0")
        if not 1 <= report["generation"] <= self.generation:
            return Refusal("bad_report", f"generation {report['generation']} was never handed out")
        if report["step"] > self.job.spec.rounds:
            return Refusal(
                "bad_report", f"step {report['step']} past the job's {self.job.spec.rounds}"
            )
        prefix = f"{worker}/{self.job.spec.id}/{report['generation']}/"
        if not msg.key.startswith(prefix):
            return Refusal(
                "bad_key", f"a report of generation {report['generation']} has key {msg.key!r}"
            )
        if msg.tensors:
            if report["end"] not in ("checkpoint", "done"):
                return Refusal("bad_report", f"a {report['end']} report carries no tensors")
            return self._check_checkpoint(msg)
        return None

    def _check_checkpoint(self, msg: Message) -> Refusal | None:
        model = self.job.model.state_dict()
        missing = set(model) - set(msg.tensors)
        if missing:
            return Refusal("bad_checkpoint", f"the checkpoint lacks {sorted(missing)[:5]}")
        largest = max((t.numel() for t in model.values()), default=0)
        for name, wt in msg.tensors.items():
            if name in model:
                target = model[name]
                if tuple(target.shape) != wt.shape or target.dtype != wt.dtype:
                    return Refusal(
                        "bad_shape",
                        f"{name}: {list(wt.shape)} {wt.dtype}, the model has "
                        f"{list(target.shape)} {target.dtype}",
                    )
                if target.is_floating_point() and not torch.isfinite(wt.to_tensor()).all():
                    return Refusal("not_finite", f"{name} holds NaN or Inf")
            elif not name.startswith("optimizer/") or math.prod(wt.shape) > largest:
                return Refusal("bad_checkpoint", f"unexpected tensor {name!r} in a checkpoint")
        try:
            bytes.fromhex(str(msg.meta["collective"].get("layout", "")))
        except ValueError:
            return Refusal("bad_checkpoint", "collective.layout is not hex")
        return None

    def _commit_checkpoint(self, msg: Message, report: dict[str, Any]) -> None:
        rule, step = self.rule, report["step"]
        rule.begin_round()
        rule.accumulate(self._as_update(msg))
        rule.optimizer_layout = str(report.get("layout", ""))
        rule.position = {k: int(report[k]) for k in ("step", "epoch", "offset")}
        metrics = {
            "loss": float(msg.meta["loss"]),
            "samples": int(msg.meta["num_samples"]),
            "generation": report["generation"],
            "world": len(self.ranks),
            "updates": 1,
        }
        if self._commit(step, metrics):
            self.committed = step

    def _as_update(self, msg: Message) -> Any:
        from elastic.rules import Update  # noqa: PLC0415

        return Update(
            worker=msg.sender,
            base_version=msg.version,
            num_samples=int(msg.meta["num_samples"]),
            loss=float(msg.meta["loss"]),
            kind="checkpoint",
            tensors=msg.tensors,
        )

    # ------------------------------------------------------------- failures --

    def on_worker_failed(self, worker: str, round_: int, detail: str, key: str = "") -> None:
        log.warning(
            "worker cannot run the collective job job=%s worker=%s detail=%s",
            self.job.spec.id,
            worker,
            detail,
        )
        self.refused.add(worker)
        self.holders.pop(worker, None)

    def on_member_left(self, worker: str) -> None:
        self.holders.pop(worker, None)
        self.silent.discard(worker)
        self.refused.discard(worker)

    def _abandon_work(self, why: str) -> None:
        self.ranks, self.reported, self.broken_at = [], set(), None

    @property
    def in_flight(self) -> bool:
        return bool(self.ranks) and not self.job.done

    def _in_progress(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "world": len(self.ranks),
            "ranks": list(self.ranks),
            "step": self.job.round,
            "checkpoint_step": self.committed,
        }
