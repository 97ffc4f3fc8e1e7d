"""Committing a model version: fence, finalize, evaluate, record, checkpoint, finish."""

from __future__ import annotations

import logging
import time
from typing import Any

from elastic.coordinator.context import EngineContext
from elastic.coordinator.job import Job, JobState
from elastic.coordinator.status import StatusPublisher
from elastic.coordinator.threads import every_core
from elastic.errors import Fenced
from elastic.training import move_to_fresh_memory
from elastic.wire.buffers import BufferSet

__all__ = ["Committer"]

log = logging.getLogger("elastic.rounds")


class Committer:
    """Turns the rule's aggregate into the job's next model version, unless fenced.

    Attributes:
        model_sends: the trackers of the WORK sends whose frames alias the model's
            own memory (no copy per round). Before the rule writes the model, memory
            a queued frame still reads is left to it and the model moves to a copy.
        fenced: another coordinator leads: nothing more is committed, ever.
    """

    def __init__(
        self, job: Job, ctx: EngineContext, status: StatusPublisher, workers_wait: bool = False
    ) -> None:
        self.job = job
        self.ctx = ctx
        self.status = status
        self.model_sends = BufferSet({}, busy=False)
        self.fenced = False
        self.workers_wait = workers_wait  # the commit takes every core (``threads``)

    def commit(
        self, number: int, metrics: dict[str, Any], members: int, last: bool = False
    ) -> bool | None:
        """Write the rule's aggregate into the model as version + 1.

        ``number`` is the round (or, for asynchronous rules, the version) committed;
        ``metrics`` its figures; ``last`` makes it the job's last (the operator asked
        to finish). Evaluates, records history, checkpoints, and finishes the job
        after its last round. Returns the fence's verdict: True (committed), False
        (another coordinator leads; nothing more will be) or None (leadership
        unconfirmed); on anything but True the rule's aggregate is untouched, for
        the caller to drop or keep.
        """
        job, spec = self.job, self.job.spec
        verdict = self.still_ours()
        if verdict is not True:
            self.fenced = verdict is False
            reason = (
                "another coordinator leads"
                if self.fenced
                else "leadership not confirmed (the cluster is silent)"
            )
            log.warning("round not committed job=%s round=%d reason=%s", spec.id, number, reason)
            self.ctx.notify("elastic_round_abandoned", job_id=spec.id, round=number, reason=reason)
            return verdict
        if not self.model_sends.free:  # e.g. a frozen straggler has not read its WORK
            log.debug(
                "model memory still being sent job=%s round=%d: moving the model to a copy",
                spec.id,
                number,
            )
            move_to_fresh_memory(job.model)
            self.model_sends = BufferSet({}, busy=False)
        with every_core(self.workers_wait):
            job.aggregator.finalize()
        job.round, job.version = number, job.version + 1
        metrics = {
            "round": number,
            "version": job.version,
            **metrics,
            **job.aggregator.figures(),
            "members": members,
            "at": round(time.time(), 3),
        }
        last = last or number >= spec.rounds
        if last or (spec.eval_every and number % spec.eval_every == 0):
            with every_core(self.workers_wait):
                metrics.update(job.evaluate())
        job.record(metrics)
        if last:
            job.state = JobState.FINISHED
            job.final_metrics = {
                k: v for k, v in metrics.items() if k in ("loss", "eval_loss", "accuracy")
            } | {"rounds": job.round}
        if last or number % spec.checkpoint.every == 0:
            try:
                started = time.perf_counter()
                path = job.checkpoint(self.still_ours)
                self.ctx.notify(
                    "elastic_checkpoint_saved",
                    job_id=spec.id,
                    round=number,
                    path=str(path),
                    seconds=time.perf_counter() - started,
                )
            except Fenced as exc:  # leadership unsure between the fence and the publish
                log.error("checkpoint not published job=%s round=%d: %s", spec.id, number, exc)
                if self.ctx.fence() is False:  # another leader: stop here, publish nothing more
                    self.fenced = True
                    return True
                # else the cluster is only silent: the next checkpoint will carry this version
        loss = metrics.get("loss", float("nan"))
        log.info(
            "round committed job=%s round=%d version=%d updates=%d loss=%.4f%s",
            spec.id,
            number,
            job.version,
            metrics.get("updates", 0),
            loss,
            "".join(f" {k}={metrics[k]:.4f}" for k in ("eval_loss", "accuracy") if k in metrics),
        )
        self.ctx.notify(
            "elastic_round_completed",
            job_id=spec.id,
            round=number,
            version=job.version,
            metrics=metrics,
        )
        if last:
            self.finish()
        else:
            self.status.write()
        return True

    def still_ours(self) -> bool | None:
        """The fence, then the lease by the local clock. A process stopped right after
        the backend said yes (SIGSTOP, a stalled VM) may wake past its lease while a
        new leader writes the same checkpoint: asked after the backend call, the
        clock leaves no gap but the rename itself. None (unsure) when only the clock
        says no."""
        verdict = self.ctx.fence()
        if verdict is True and not self.ctx.holds():
            return None
        return verdict

    def finish(self, state: JobState = JobState.FINISHED) -> None:
        """The job is over (``state``: finished, or its budget spent): the final
        model written, the observers told."""
        job = self.job
        job.state = state
        path = job.save_final_model()
        final = job.final_metrics | {
            "model": str(path),
            "wall_seconds": round(job.wall_seconds(), 3),
        }
        log.info(
            "job finished job=%s rounds=%d %s",
            job.spec.id,
            job.round,
            " ".join(f"{k}={v}" for k, v in final.items()),
        )
        self.ctx.notify(
            "elastic_job_finished", job_id=job.spec.id, state=str(job.state), metrics=final
        )
        self.status.write()
