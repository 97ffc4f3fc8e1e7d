"""Checking an update before any of it is folded: a message in, an ``Update`` (or a
part of one) or a refusal out. The message is never written to: what the rule
receives is a new ``Update`` (decoded through the job's codec chain, made whole
where its weights came as a change, clipped where the job says so).

The order, the path of every update: its kind; its codecs against the job's chain
(``codec_mismatch``), decoded; NaN/Inf where a codec could make them; its names,
shapes and dtypes against the model's; for weights sent as a change, the weights the
worker trained from added back; the job's rate and size limits; the norm bound
(refused or clipped); last, the plugins' veto (``elastic_validate_update``). The
engine checks what only it knows first (its round, the worker's turn, staleness).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from elastic.coordinator.context import EngineContext
from elastic.coordinator.job import Job
from elastic.errors import ProtocolError
from elastic.rules import Update
from elastic.tasks import MAX_TRAIN_METRICS, is_train_metric
from elastic.training import update_kind, update_template
from elastic.wire.header import Message
from elastic.wire.parts import Segment, grid
from elastic.wire.tensors import WireTensor

__all__ = ["UpdateValidator", "Refusal", "check_train_metrics", "MAX_TRAIN_METRICS"]

log = logging.getLogger("elastic.rounds")


@dataclass(frozen=True)
class Refusal:
    """Why an update is refused: the NACK's reason (a short code) and its detail."""

    reason: str
    detail: str


Weights = Callable[[], Mapping[str, torch.Tensor]]


def check_train_metrics(msg: Message) -> Refusal | None:
    """Why an update's extra training figures (``metrics``: a task's own loop's) are
    refused, if they are: at most ``MAX_TRAIN_METRICS`` short names, each a finite number."""
    metrics = msg.meta.get("metrics", {})
    if len(metrics) > MAX_TRAIN_METRICS:
        return Refusal(
            "bad_metrics", f"{len(metrics)} training metrics; send at most {MAX_TRAIN_METRICS}"
        )
    for name, value in metrics.items():
        if not is_train_metric(name, value):
            return Refusal(
                "bad_metrics",
                f"training metric {str(name)[:64]!r} = {str(value)[:32]}: metrics are names of "
                "at most 64 characters with finite numbers",
            )
    return None


class UpdateValidator:
    """The checks of one job's updates. ``base`` gives the weights the workers
    trained from (the model, or the downlink's reference when the model goes down
    compressed). The one state it keeps is when each worker's last updates came
    (the job's rate limit)."""

    def __init__(self, job: Job, ctx: EngineContext, base: Weights) -> None:
        self.job = job
        self.ctx = ctx
        self.base = base
        self.mode = job.aggregator.worker_mode
        self.kind = update_kind(self.mode)
        # What updates travel as: the model's tensors, or the rule's own form (a
        # secure aggregation's masked tensors), checked exactly and never decoded.
        self.wire = job.aggregator.wire_form()
        self.template = self.wire or {
            k: (tuple(t.shape), t.dtype) for k, t in update_template(job.model, self.mode).items()
        }
        self.itemsizes = {name: dtype.itemsize for name, (_, dtype) in self.template.items()}
        self.update_bytes = sum(
            math.prod(shape) * dtype.itemsize for shape, dtype in self.template.values()
        )
        self._recent: dict[str, deque[float]] = {}  # per worker: when its last updates came
        self._grid: tuple[int, list[list[Segment]]] | None = None

    # --------------------------------------------------------------- whole --

    def check(
        self, worker: str, msg: Message, wire_bytes: int, staleness: int = 0
    ) -> Update | Refusal:
        """A whole update, checked end to end; ``wire_bytes`` as sent."""
        if msg.meta["kind"] != self.kind:
            return Refusal(
                "wrong_kind",
                f"rule {self.job.spec.rule} needs {self.kind} updates, got {msg.meta['kind']}",
            )
        tensors = self._decoded(msg)
        if isinstance(tensors, Refusal):
            return tensors
        return self._screened(worker, msg, tensors, wire_bytes, staleness)

    def _decoded(self, msg: Message) -> dict[str, WireTensor] | Refusal:
        """The tensors as the model's: codecs undone, shapes checked, weights whole."""
        if self.wire is not None:
            return self._in_wire_form(msg)
        chain = self.job.update_chain
        tensors = dict(msg.tensors)
        if msg.encodings or chain:
            # The parts were checked for NaN/Inf; what they decode to is too, unless
            # every stage keeps finite values finite (a cast up: fp16, bf16).
            recheck = [
                name
                for name, records in msg.encodings.items()
                if name in self.template and not chain.keeps_finite(records, self.template[name][1])
            ]
            try:
                tensors = chain.expand(msg, self.template)
            except ProtocolError as exc:
                return Refusal(exc.reason, exc.detail)
            for name in recheck:
                if not tensors[name].is_finite():
                    return Refusal("non_finite", f"tensor {name!r} decodes to NaN or Inf")
        if set(tensors) != set(self.template):
            missing = sorted(set(self.template) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(self.template))[:3]
            return Refusal(
                "shape_mismatch",
                f"tensor names differ from the model (missing {missing}, unexpected {extra})",
            )
        for name, (shape, dtype) in self.template.items():
            t = tensors[name]
            if t.shape != shape or not t.dtype.is_floating_point:
                return Refusal(
                    "shape_mismatch",
                    f"tensor {name!r} is {list(t.shape)} {t.dtype}, the model has {list(shape)} "
                    f"{dtype}",
                )
        if (
            chain and self.kind == "weights"
        ):  # through a chain, trained weights travel as their change
            base = self.base()
            tensors = {
                name: WireTensor.from_tensor(
                    wt.to_tensor().to(base[name].dtype).reshape(base[name].shape)
                    + base[name].detach()
                )
                for name, wt in tensors.items()
            }
        return tensors

    def _in_wire_form(self, msg: Message) -> dict[str, WireTensor] | Refusal:
        """The tensors of an update in the rule's own form: exactly its names,
        shapes and dtypes, uncompressed."""
        if msg.encodings:
            return Refusal("bad_form", f"rule {self.job.spec.rule} takes its updates uncompressed")
        tensors = dict(msg.tensors)
        for name, (shape, dtype) in self.template.items():
            t = tensors.get(name)
            if t is None or t.shape != shape or t.dtype != dtype:
                got = "nothing" if t is None else f"{list(t.shape)} {t.dtype}"
                return Refusal(
                    "shape_mismatch", f"tensor {name!r} must be {list(shape)} {dtype}, got {got}"
                )
        if len(tensors) != len(self.template):
            extra = sorted(set(tensors) - set(self.template))[:3]
            return Refusal("shape_mismatch", f"unexpected tensors {extra}")
        return tensors

    def _screened(
        self,
        worker: str,
        msg: Message,
        tensors: dict[str, WireTensor],
        wire_bytes: int,
        staleness: int,
    ) -> Update | Refusal:
        """The job's limits, the norm bound, and the plugins' veto, on a well-formed update."""
        limits = self.job.spec.limits
        refusal = self.limit(worker, wire_bytes)
        if refusal is not None:
            return refusal
        if limits.max_norm:
            bounded = self._bounded(
                msg.sender, tensors, limits.max_norm, limits.norm_action == "clip"
            )
            if isinstance(bounded, Refusal):
                return bounded
            tensors = bounded
        update = self._update(worker, msg, tensors, staleness)
        if isinstance(update, Refusal):
            return update
        veto = self.ctx.ask(
            "elastic_validate_update", job_id=self.job.spec.id, worker_id=worker, update=update
        )
        if veto is not None:
            plugin, answer = veto
            return Refusal(
                "vetoed",
                f"validator {plugin} failed: {answer}"
                if isinstance(answer, Exception)
                else f"{plugin}: {answer}",
            )
        return update

    def limit(self, worker: str, wire_bytes: int) -> Refusal | None:
        """The job's rate and size limits on an update of ``wire_bytes``."""
        limits, now = self.job.spec.limits, self.ctx.clock()
        if limits.max_updates_per_minute:
            recent = self._recent.setdefault(worker, deque())
            while recent and now - recent[0] > 60.0:
                recent.popleft()
            if len(recent) >= limits.max_updates_per_minute:
                return Refusal(
                    "rate_limited",
                    f"more than {limits.max_updates_per_minute} updates in a minute from {worker}",
                )
            recent.append(now)
        if limits.max_update_bytes and wire_bytes > limits.max_update_bytes:
            return Refusal(
                "too_large",
                f"update of {wire_bytes} bytes, the job allows {limits.max_update_bytes}",
            )
        return None

    def _bounded(
        self, sender: str, tensors: dict[str, WireTensor], bound: float, clip: bool
    ) -> dict[str, WireTensor] | Refusal:
        """The L2 norm of the update's change (trained minus sent weights, or the
        gradient or delta itself), refused or clipped when over ``bound``."""
        relative = self.kind == "weights"
        base = self.base() if relative else {}
        changes = {}
        total = 0.0
        for name, wt in tensors.items():
            t = wt.to_tensor().to(torch.float32)
            change = t - base[name].detach().reshape(t.shape).to(torch.float32) if relative else t
            changes[name] = change
            total += float(change.pow(2).sum())
        norm = math.sqrt(total)
        if norm <= bound:
            return tensors
        if not clip:
            return Refusal(
                "norm_too_large", f"the update's L2 norm is {norm:.4g}, the job allows {bound:.4g}"
            )
        scale = bound / norm
        clipped = {}
        for name, change in changes.items():
            scaled = change.mul_(scale) + (
                base[name].detach().reshape(change.shape).to(torch.float32) if relative else 0
            )
            clipped[name] = WireTensor.from_tensor(scaled.to(tensors[name].dtype))
        log.info(
            "update clipped job=%s sender=%s norm=%.4g bound=%.4g",
            self.job.spec.id,
            sender,
            norm,
            bound,
        )
        return clipped

    def _update(
        self, worker: str, msg: Message, tensors: Mapping[str, WireTensor], staleness: int = 0
    ) -> Update | Refusal:
        """The one place an ``Update`` is made from a message."""
        samples = self._samples(worker, msg)
        if isinstance(samples, Refusal):
            return samples
        return Update(
            worker,
            msg.version,
            samples,
            float(msg.meta["loss"]),
            msg.meta["kind"],
            tensors,
            staleness,
            dict(msg.meta.get("privacy", {})),
        )

    def _samples(self, worker: str, msg: Message) -> int | Refusal:
        """The sample count an update may claim (its weight in FedAvg), bounded by
        what the coordinator can bound: one batch for a gradient; the samples the
        worker says it holds (``data_size``) times the job's local epochs; the
        job's ``max_samples_per_update``. Over the bound the claim is clipped to it
        (counted: ``samples_clipped``) or refused, as ``samples_action`` says."""
        claimed = int(msg.meta["num_samples"])
        spec = self.job.spec
        bounds: list[tuple[int, str]] = []
        if spec.limits.max_samples_per_update:
            bounds.append((spec.limits.max_samples_per_update, "[limits] max_samples_per_update"))
        held = msg.meta.get("data_size")
        if self.kind == "gradient" and spec.train.batch_size:
            bounds.append((spec.train.batch_size, "one batch ([train] batch_size)"))
        elif held is not None:
            epochs = spec.train.local_epochs
            bounds.append((held * epochs, f"the {held} samples it holds x {epochs} epoch(s)"))
        if not bounds:
            return claimed
        bound, why = min(bounds)
        if claimed <= bound:
            return claimed
        if spec.limits.samples_action == "reject":
            return Refusal(
                "too_many_samples",
                f"{worker} claims {claimed} samples, over {bound}: {why}; an update's sample "
                "count is its weight, and the job bounds it",
            )
        self.job.totals["samples_clipped"] = self.job.totals.get("samples_clipped", 0) + 1
        log.warning(
            "sample count clipped job=%s sender=%s claimed=%d bound=%d (%s)",
            spec.id,
            msg.sender,
            claimed,
            bound,
            why,
        )
        return bound

    # --------------------------------------------------------------- parts --

    def parts(self, part_bytes: int) -> list[list[Segment]]:
        """How this job's updates are cut into parts of about ``part_bytes``."""
        if self._grid is None or self._grid[0] != part_bytes:
            self._grid = (
                part_bytes,
                grid(
                    (
                        (name, math.prod(shape), dtype.itemsize)
                        for name, (shape, dtype) in self.template.items()
                    ),
                    part_bytes,
                ),
            )
        return self._grid[1]

    def check_part(
        self, worker: str, msg: Message, segments: list[Segment], first: bool
    ) -> Update | Refusal:
        """One part: its kind, its tensors against the segments it was granted for,
        and (on the first part) the rate and size limits for the whole update."""
        if msg.meta["kind"] != self.kind:
            return Refusal(
                "wrong_kind",
                f"rule {self.job.spec.rule} needs {self.kind} updates, got {msg.meta['kind']}",
            )
        if msg.encodings:
            return Refusal("bad_part", "a part of an update must come uncompressed")
        if list(msg.tensors) != [name for name, _, _ in segments]:
            return Refusal(
                "bad_part",
                f"part has tensors {list(msg.tensors)[:3]}, granted "
                f"{[name for name, _, _ in segments][:3]}",
            )
        for name, start, stop in segments:
            t = msg.tensors[name]
            dtype = self.template[name][1]
            if t.shape != (stop - start,) or not (
                t.dtype == dtype if self.wire is not None else t.dtype.is_floating_point
            ):
                return Refusal(
                    "bad_part",
                    f"part of {name!r} is {list(t.shape)} {t.dtype}, granted [{stop - start}] "
                    f"{dtype if self.wire is not None else 'floating point'}",
                )
        if first:
            refusal = self.limit(worker, self.update_bytes)
            if refusal is not None:
                return refusal
        return self._update(worker, msg, dict(msg.tensors))
