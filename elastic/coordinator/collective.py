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
from elastic.coordinator.uploads import Part
from elastic.coordinator.validation import Refusal
from elastic.distributed import packed
from elastic.membership.base import Member
from elastic.rules import CollectiveRule, Update
from elastic.wire.header import Message, MsgType
from elastic.wire.parts import Segment, grid
from elastic.wire.tensors import WireTensor

__all__ = ["CollectiveEngine", "BROKEN_GRACE"]

log = logging.getLogger("elastic.rounds")
BROKEN_GRACE = 0.3  # seconds a broken generation waits for all its ranks to report
ENDS = ("progress", "checkpoint", "stopped", "broken", "done")


class CollectiveEngine(Engine):
    """Generations of a collective job (``CollectiveRule``)."""

    folds_parts = True  # checkpoints may come in parts (``upload_parts``)

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
        self.step_seconds = 0.0  # rank 0's median step, as it last said
        self.itemsizes = {packed.NAME: 1}  # what checkpoints in parts are cut by
        self._staging: dict[str, tuple[str, torch.Tensor]] = {}  # checkpoints coming in parts
        self.first_step_seen = 0  # the newest generation whose first step was reported
        # The running generation only holds the state: the job is paused, finishing or
        # cancelled, and its members stopped training after a step they agreed on.
        self.holding = False

    # ------------------------------------------------------------ generations --

    def tick(self, members: list[Member]) -> list[Outgoing]:
        job = self.job
        self.members_now = len(members)
        if self.fenced or not self.ctx.holds():
            return []
        now = self.clock()
        here = [m.id for m in members if m.id not in self.refused]
        if job.done or self.paused or self.finishing:
            return self._hold(here)
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

    def _hold(self, here: list[str]) -> list[Outgoing]:
        """Paused, finishing or cancelled: members that train are handed a generation
        of no steps (they stop after a step all agree on, share the state, and rank 0
        sends it as a checkpoint: with ``finish``, the final model); then nothing."""
        trains = self.ranks and not self.holding
        if trains and (not self.job.done or self.job.state is JobState.CANCELLED):
            present = [w for w in self.ranks if w in here]
            if present:
                return self._start(present, hold=True)
            self.ranks = []
        if not self.job.done:
            self._pause_if_asked(idle=not self.ranks or len(self.reported) == len(self.ranks))
        return []

    def _due(self, here: list[str], now: float) -> bool:
        """Whether the running generation must give way to a new one."""
        if not self.ranks or self.holding:
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

    def _start(self, chosen: list[str], hold: bool = False) -> list[Outgoing]:
        job, spec = self.job, self.job.spec
        self.generation += 1
        self.ranks, self.reported, self.broken_at = chosen, set(), None
        self.holding = hold
        carry = not any(w in self.holders for w in chosen)
        store = self.ctx.collective_store()
        tensors: dict[str, WireTensor] = {}
        if carry:  # nobody holds the state: the newest checkpoint is it
            job.round = self.rule.position["step"]  # steps after it are done again
            state = {k: v.detach() for k, v in job.model.state_dict().items()}
            state |= self.rule.optimizer_state
            tensors = {k: WireTensor.from_tensor(v) for k, v in state.items()}
        if job.state is not JobState.RUNNING and not hold:
            job.mark_running()
        log.info(
            "new generation job=%s generation=%d members=%s step=%d state_from=%s%s",
            spec.id,
            self.generation,
            ",".join(chosen),
            job.round,
            "checkpoint" if carry else "rank 0",
            " holding (no steps)" if hold else "",
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
                "steps": 0 if hold else spec.rounds,
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
        if refusal is None and msg.tensors:
            checked = self._check_checkpoint(msg, report, whole=True)
            refusal = checked if isinstance(checked, Refusal) else None
        if refusal is not None:
            return self._nack(msg, refusal)
        assert isinstance(report, dict)
        self._take_report(worker, report)
        if msg.tensors:
            refusal = self._commit_checkpoint(msg, report, msg.tensors[packed.NAME].to_tensor())
            if refusal is not None:
                return self._nack(msg, refusal)
        elif report["end"] == "progress":
            self.publisher.write()
        self._finish_if_held(worker, report)
        return self._ack(msg)

    def on_update_part(self, worker: str, msg: Message, part: Part) -> Message | None:
        """A checkpoint in parts: each part's bytes into a staging copy, committed
        once the last is in (a stream given up commits nothing)."""
        report = msg.meta.get("collective")
        refusal = self._check(worker, msg, report)
        if refusal is None and part.first:
            checked = self._check_checkpoint(msg, report, whole=False)
            if isinstance(checked, Refusal):
                refusal = checked
            else:
                self._staging[worker] = (msg.key, torch.empty(checked[1], dtype=torch.uint8))
        staged = self._staging.get(worker)
        if refusal is None and (staged is None or staged[0] != msg.key):
            refusal = Refusal("bad_part", f"a part of {msg.key} whose first part never came")
        if refusal is None:
            assert staged is not None
            refusal = self._copy_part(msg, part, staged[1])
        if refusal is not None:
            self._staging.pop(worker, None)
            return self._nack(msg, refusal)
        if not part.last:
            return None
        assert isinstance(report, dict) and staged is not None
        self._staging.pop(worker, None)
        self._take_report(worker, report)
        refusal = self._commit_checkpoint(msg, report, staged[1])
        if refusal is not None:
            return self._nack(msg, refusal)
        self._finish_if_held(worker, report)
        return self._ack(msg)

    def _finish_if_held(self, worker: str, report: dict[str, Any]) -> None:
        """Finishing, and rank 0 of the holding generation is done: the newest
        checkpoint (its own, if it was newer) is the final model."""
        if (
            self.finishing
            and self.holding
            and not self.job.done
            and report["end"] == "done"
            and report["generation"] == self.generation
            and self.ranks[:1] == [worker]
        ):
            self._finish_if_due()

    def abandon_parts(self, worker: str, key: str) -> None:
        if self._staging.get(worker, ("",))[0] == key:
            del self._staging[worker]

    @staticmethod
    def _copy_part(msg: Message, part: Part, staging: torch.Tensor) -> Refusal | None:
        if list(msg.tensors) != [packed.NAME] or [s[0] for s in part.segments] != [packed.NAME]:
            return Refusal("bad_part", f"a checkpoint's part carries {packed.NAME!r} only")
        (_, start, stop), wt = part.segments[0], msg.tensors[packed.NAME]
        if stop > staging.numel() or wt.shape != (stop - start,) or wt.dtype != torch.uint8:
            return Refusal("bad_part", f"bytes {start}:{stop} do not fit the checkpoint's layout")
        if part.last and stop != staging.numel():
            return Refusal("bad_part", "the checkpoint's parts end before its layout does")
        wt.copy_to(staging[start:stop])
        return None

    def _ack(self, msg: Message) -> Message:
        return Message(MsgType.ACK, job=msg.job, round=msg.round, version=msg.version, key=msg.key)

    def _take_report(self, worker: str, report: dict[str, Any]) -> None:
        """What a checked report says: who holds state, who answered, progress."""
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
        if current and self.ranks.index(worker) == 0:
            self.step_seconds = float(report.get("step_seconds", 0.0))
            trained = end in ("progress", "checkpoint", "done") and not self.holding
            if trained and self.first_step_seen < generation:
                self.first_step_seen = generation  # when training went on again
                self.job.note("first_step", generation=generation, step=step)
            if step > self.job.round:
                self.job.round = step  # progress, shown in the status

    def _check(self, worker: str, msg: Message, report: Any) -> Refusal | None:
        """A report's claims against what this engine handed out and what it can bound."""
        if not isinstance(report, dict) or report.get("end") not in ENDS:
            return Refusal("bad_report", f"a collective report needs collective.end in {ENDS}")
        for key in ("generation", "step", "epoch", "offset"):
            if type(report.get(key)) is not int or report[key] < 0:
                return Refusal("bad_report", f"collective.{key} must be an int >= 0")
        seconds = report.get("step_seconds", 0.0)
        if type(seconds) is not float or not 0 <= seconds < 1e6:
            return Refusal("bad_report", "collective.step_seconds must be seconds >= 0")
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
        if msg.tensors and report["end"] not in ("checkpoint", "done"):
            return Refusal("bad_report", f"a {report['end']} report carries no tensors")
        return None

    def _check_checkpoint(
        self, msg: Message, report: Any, whole: bool
    ) -> tuple[packed.Layout, int] | Refusal:
        """A checkpoint's layout, and its bytes (all of them here when ``whole``); the
        tensors are checked as they are committed."""
        if list(msg.tensors) != [packed.NAME] or msg.tensors[packed.NAME].dtype != torch.uint8:
            return Refusal("bad_checkpoint", f"a checkpoint is one uint8 tensor {packed.NAME!r}")
        try:
            bytes.fromhex(str(report.get("layout", "")))
        except ValueError:
            return Refusal("bad_checkpoint", "collective.layout is not hex")
        model = self.job.model.state_dict()
        most = 4 * sum(t.numel() * t.element_size() for t in model.values()) + (1 << 20)
        checked = packed.check(report.get("tensors"), model, most)
        if isinstance(checked, str):
            return Refusal("bad_checkpoint", checked)
        if whole and checked[1] != msg.tensors[packed.NAME].numel:
            return Refusal("bad_checkpoint", "the checkpoint's bytes differ from its layout")
        return checked

    def _commit_checkpoint(
        self, msg: Message, report: dict[str, Any], flat: torch.Tensor
    ) -> Refusal | None:
        """Rank 0's model, optimizer state and position, as the job's next version."""
        step = report["step"]
        tensors = packed.unpack(report["tensors"], flat)
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return Refusal("not_finite", f"{name} holds NaN or Inf")
        if step <= self.committed or self.job.done:
            return None  # older than the newest checkpoint: nothing to keep
        rule = self.rule
        rule.begin_round()
        rule.accumulate(
            Update(
                worker=msg.sender,
                base_version=msg.version,
                num_samples=int(msg.meta["num_samples"]),
                loss=float(msg.meta["loss"]),
                kind="checkpoint",
                tensors={k: WireTensor.from_tensor(v) for k, v in tensors.items()},
            )
        )
        rule.optimizer_layout = str(report.get("layout", ""))
        rule.position = {k: int(report[k]) for k in ("step", "epoch", "offset")}
        metrics = {
            "loss": float(msg.meta["loss"]),
            "samples": int(msg.meta["num_samples"]),
            "generation": report["generation"],
            "world": len(self.ranks),
            "updates": 1,
            "step_seconds": self.step_seconds,
        }
        if self._commit(step, metrics):
            self.committed = step
        return None

    def upload_parts(self, part_bytes: int, offered: int = 0) -> list[list[Segment]] | None:
        """A checkpoint is one flat byte tensor: cut into parts by bytes."""
        if part_bytes <= 0 or offered <= 0:
            return None
        return grid([(packed.NAME, offered, 1)], part_bytes)

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
        # (the members still train: the next tick hands them a generation of no steps)
        self._staging.clear()

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
            "step_seconds": self.step_seconds,
        }
