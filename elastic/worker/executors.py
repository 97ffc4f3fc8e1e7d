"""What a worker computes for a WORK, chosen by the job's rule (the WORK's ``mode``).

An executor is the compute step between the intake (``intake.py``: the job's model
and data, the received model loaded) and the packing (``packing.py``: the codec
chain, parts, shared memory). ``LocalTraining`` trains on the worker's data for the
job's epochs (FedAvg, FedOpt, the asynchronous rules), in the runtime's loop or in the
task's own (``Task.train``); ``GradientStep`` takes the
gradient of one batch (``syncavg``). A new kind of work (a collective step, a
user's own training loop, a whole sub-coordinator) is a new executor here and a
mode a rule asks for.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from elastic.errors import ElasticError
from elastic.jobspec import TrainParams
from elastic.tasks import MAX_TRAIN_METRICS, TrainContext, TrainResult, is_train_metric
from elastic.training import batch_gradient, local_train, update_template
from elastic.wire.buffers import reusable
from elastic.wire.header import Message
from elastic.worker.intake import JobContext

__all__ = ["WorkExecutor", "LocalTraining", "GradientStep", "Computed", "EXECUTORS"]


@dataclass
class Computed:
    """An executor's result: the update's tensors (by state-dict name), and its
    figures. ``from_parameters``: the tensors are the model's own parameters."""

    update: dict[str, torch.Tensor]
    num_samples: int
    loss: float
    seconds: float
    from_parameters: bool
    metrics: dict[str, float] = field(default_factory=dict)  # a task's own loop's extra figures


class WorkExecutor(ABC):
    """Computes a WORK's update on the model the intake loaded.

    Class attributes:
        modes: the WORK modes (a rule's ``worker_mode``) this executor serves.
    """

    modes: ClassVar[tuple[str, ...]]

    def __init__(self, device: torch.device, cancel: threading.Event | None = None) -> None:
        self.device = device
        self.cancel = cancel  # set: the work stops at its next batch (``Cancelled``)

    @abstractmethod
    def compute(self, ctx: JobContext, work: Message, relative: bool) -> Computed | tuple[str, str]:
        """The update, or the NACK's reason and detail. ``relative``: the update goes
        through a codec chain, so trained weights are sent as their change."""

    @staticmethod
    def seed(work: Message) -> int:
        """This worker's seed for this round: the job's, the round's and its shard's."""
        return (int(work.meta["seed"]) * 1_000_003 + work.round) * 1009 + int(work.meta["shard"][0])


class LocalTraining(WorkExecutor):
    """Local epochs on the worker's data; the update is the trained weights (``train``)
    or trained minus received weights (``delta``, and any compressed update: codecs
    sparsify or quantise the change, never the weights themselves)."""

    modes = ("train", "delta")

    def compute(self, ctx: JobContext, work: Message, relative: bool) -> Computed:
        mode = work.meta["mode"]
        weights = update_template(ctx.model, mode)
        relative = relative or mode == "delta"
        own = ctx.task.owns_training_loop()
        received = (
            {k: reusable(ctx.received, k, v).copy_(v.detach()) for k, v in weights.items()}
            if relative or own
            else {}
        )
        params = TrainParams(**work.meta["train"])
        started = time.perf_counter()
        if own:
            result = self._task_loop(ctx, work, params, received)
        else:
            result = local_train(
                ctx.task,
                ctx.model,
                ctx.dataset,
                params,
                self.seed(work),
                self.device,
                self.cancel,
            )
        seconds = time.perf_counter() - started
        if relative:
            with torch.no_grad():
                for name, start in received.items():  # trained minus received, in place
                    weights[name].sub_(start)
        return Computed(
            {k: v.detach() for k, v in weights.items()},
            result.num_samples,
            result.loss,
            seconds,
            from_parameters=True,
            metrics=result.metrics,
        )

    def _task_loop(
        self, ctx: JobContext, work: Message, params: TrainParams, received: dict
    ) -> TrainResult:
        """The task's own ``train``, its answer checked (it is the user's code)."""
        ctx.model.train()
        result = ctx.task.train(
            ctx.model,
            ctx.dataset,
            TrainContext(
                self.device,
                params,
                received,
                self.seed(work),
                work.round,
                self.cancel,
                work.job,
                client=int(work.meta["shard"][0]),
            ),
        )
        name = type(ctx.task).__name__
        if not isinstance(result, TrainResult):
            raise ElasticError(
                f"{name}.train returned {type(result).__name__}; return "
                "TrainResult(num_samples, loss) (from elastic.api import TrainResult)"
            )
        samples = result.num_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ElasticError(
                f"{name}.train returned num_samples={samples!r}; it must be the number of "
                "samples trained on, an int >= 1"
            )
        try:  # (a loss tensor is welcome: its graph is let go)
            loss = float(
                result.loss.detach() if isinstance(result.loss, torch.Tensor) else result.loss
            )
        except (TypeError, ValueError):
            raise ElasticError(
                f"{name}.train returned loss={result.loss!r}; it must be a number"
            ) from None
        return TrainResult(samples, loss, self._metrics(name, result.metrics))

    @staticmethod
    def _metrics(name: str, metrics: object) -> dict[str, float]:
        """A task's extra figures, checked: a few named finite numbers."""
        if not isinstance(metrics, dict) or len(metrics) > MAX_TRAIN_METRICS:
            raise ElasticError(
                f"{name}.train returned metrics={metrics!r}; give a dict of at most "
                f"{MAX_TRAIN_METRICS} name -> number"
            )
        out = {}
        for key, value in metrics.items():
            number = float(value.detach()) if isinstance(value, torch.Tensor) else value
            if not is_train_metric(key, number):
                raise ElasticError(
                    f"{name}.train returned metric {key!r}: {value!r}; metrics are short names "
                    "with finite numbers"
                )
            out[key] = float(number)
        return out


class GradientStep(WorkExecutor):
    """The gradient of the loss on one batch of the worker's shard, the model left as
    it came (data-parallel SGD: ``syncavg``)."""

    modes = ("gradient",)

    def compute(self, ctx: JobContext, work: Message, relative: bool) -> Computed | tuple[str, str]:
        train = TrainParams(**work.meta["train"])
        started = time.perf_counter()
        result = batch_gradient(
            ctx.task,
            ctx.model,
            ctx.dataset,
            train.batch_size,
            work.round - 1,
            int(work.meta["seed"]),
            self.device,
            train.precision,
        )
        seconds = time.perf_counter() - started
        if ctx.viewing and ctx.shared is not None and not ctx.shared.unchanged():
            return (
                "need_full_model",
                "the shared reference changed while the gradient was taken (its round was over)",
            )
        grads = {
            k: (p.grad if p.grad is not None else torch.zeros_like(p))
            for k, p in update_template(ctx.model, "gradient").items()
        }
        return Computed(grads, result.num_samples, result.loss, seconds, from_parameters=False)


EXECUTORS: tuple[type[WorkExecutor], ...] = (LocalTraining, GradientStep)
