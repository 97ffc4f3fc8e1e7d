"""Runs one unit of work: load the received model, train or take a gradient, build the update."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from elastic.compression.chain import SEP, CodecChain, Compressor, expand
from elastic.errors import Cancelled, ElasticError, ProtocolError
from elastic.jobspec import TrainParams
from elastic.plugins import Plugins
from elastic.tasks import Shard, Task
from elastic.training import (
    batch_gradient,
    local_train,
    move_to_fresh_memory,
    update_kind,
    update_template,
)
from elastic.wire.buffers import BufferPool, BufferSet, reusable
from elastic.wire.header import Message, MsgType
from elastic.wire.shm import SharedReader
from elastic.wire.tensors import WIDEN_BLOCK, WireTensor
from elastic.worker.devices import HostStaging

__all__ = ["TaskRunner", "Result"]

log = logging.getLogger("elastic.worker.runner")


@dataclass
class Result:
    """What to send back: an UPDATE (aliasing ``buffers``) or a NACK."""

    message: Message
    buffers: BufferSet | None = None


@dataclass
class _JobContext:
    key: str
    task: Task
    model: torch.nn.Module
    dataset: Dataset
    sent: BufferSet | None = None  # the last update, when its frames alias the model
    received: dict[str, torch.Tensor] = field(default_factory=dict)  # deltas: the weights trained from
    chain: CodecChain | None = None  # the job's update codec chain, as the last WORK gave it
    compressor: Compressor | None = None  # ... with its codecs' error-feedback state
    reference: dict[str, torch.Tensor] | None = None  # compressed downlink: the model as we hold it
    reference_version: int | None = None
    cast_out: dict[str, torch.Tensor] | None = None  # a one-cast chain's parts, kept across rounds
    cast_sent: BufferSet | None = None  # the last update sent from them
    shared: SharedReader | None = None  # the coordinator's reference in /dev/shm, when on its host
    viewing: bool = False  # the parameters lie in ``shared``'s mapping (taking gradients)


class TaskRunner:
    """Keeps one model and dataset per job (rebuilt only if the task or shard changes)."""

    def __init__(
        self, plugins: Plugins, device: torch.device, data_dir: Path | None, worker_id: str, cancel: threading.Event | None = None
    ) -> None:
        self.plugins = plugins
        self.cancel = cancel  # set: local training stops at the next batch
        self.device = device
        self.data_dir = data_dir
        self.worker_id = worker_id
        self.staging = HostStaging(device)
        # Host copies of updates computed on a GPU (pinned), reused once sent.
        self.outbox = BufferPool(pin=device.type == "cuda")
        # On the coordinator's host: gives tensors in the shared-memory segment the
        # next update goes through (``SegmentWriter.place``), else None.
        self.placer: Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor] | None] | None = None
        self._jobs: dict[str, _JobContext] = {}

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

    def _context(self, work: Message) -> _JobContext:
        meta = work.meta
        shard = Shard(int(meta["shard"][0]), int(meta["shard"][1]), int(meta["seed"]))
        key = json.dumps([meta["task"], meta["task_params"], meta["shard"], meta["seed"]], sort_keys=True)
        ctx = self._jobs.get(work.job)
        if ctx is None or ctx.key != key:
            task = self.plugins.tasks.get(meta["task"])(meta["task_params"])
            model = task.build_model(shard.seed).to(self.device)
            dataset = task.train_dataset(shard, self.data_dir)
            ctx = _JobContext(key, task, model, dataset)
            self._jobs[work.job] = ctx
            log.info("job loaded job=%s task=%s shard=%d/%d samples=%d", work.job, meta["task"], shard.index, shard.count, len(dataset))  # type: ignore[arg-type]
        return ctx

    def _load(self, model: torch.nn.Module, tensors: dict[str, WireTensor]) -> None:
        state = model.state_dict()
        if set(state) != set(tensors):
            raise ElasticError(f"received model does not match the task's model: {sorted(set(state) ^ set(tensors))[:5]}")
        with torch.no_grad():
            for name, wt in tensors.items():
                target = state[name]
                if tuple(target.shape) != wt.shape or target.dtype != wt.dtype:
                    raise ElasticError(f"tensor {name!r}: received {list(wt.shape)} {wt.dtype}, model has {list(target.shape)} {target.dtype}")
                if self.device.type == "cpu":
                    if len(wt.chunks) == 1 and wt.chunks[0].data_ptr() == target.data_ptr() and wt.chunks[0].numel() == target.numel():
                        continue  # already there: the reference held in the parameter itself
                    wt.copy_to(target)  # frames straight into the parameters
                else:
                    staged = self.staging.buffer(name, target)
                    wt.copy_to(staged)
                    target.copy_(staged, non_blocking=True)

    def _run(self, work: Message) -> Result:
        ctx = self._context(work)
        if ctx.sent is not None and not ctx.sent.free:  # ZeroMQ still reads the last update
            move_to_fresh_memory(ctx.model)
        ctx.sent = None
        if work.meta["mode"] != "gradient" and self.device.type == "cpu" and not work.meta.get("codecs"):
            self._into_segment(ctx.model, work.meta["mode"], work.job)
        model_in = work.tensors
        if ctx.viewing and work.meta.get("downlink") is not True:  # the model comes whole: into memory of our own
            self._leave_shared(ctx, update_template(ctx.model, "gradient"))
        if work.meta.get("downlink") is True:
            held = self._from_reference(ctx, work)
            if isinstance(held, tuple):
                return self._nack(work, *held)
            model_in = held
        self._load(ctx.model, model_in)
        mode = work.meta["mode"]
        train = TrainParams(**work.meta["train"])
        chain = self._chain(ctx, work)
        seed = (int(work.meta["seed"]) * 1_000_003 + work.round) * 1009 + int(work.meta["shard"][0])
        if mode in ("train", "delta"):
            weights = update_template(ctx.model, mode)
            # Deltas for async rules, and for any compressed update: what codecs
            # sparsify or quantise is the change, never the weights themselves.
            relative = mode == "delta" or bool(chain)
            received = {k: reusable(ctx.received, k, v).copy_(v.detach()) for k, v in weights.items()} if relative else {}
            computing = time.perf_counter()
            result = local_train(ctx.task, ctx.model, ctx.dataset, train, seed, self.device, self.cancel)
            computed = time.perf_counter() - computing
            with torch.no_grad():
                for name, start in received.items():  # trained minus received, in place
                    weights[name].sub_(start)
            update = {k: v.detach() for k, v in weights.items()}
        elif mode == "gradient":
            computing = time.perf_counter()
            result = batch_gradient(ctx.task, ctx.model, ctx.dataset, train.batch_size, work.round - 1, int(work.meta["seed"]), self.device)
            computed = time.perf_counter() - computing
            if ctx.viewing and ctx.shared is not None and not ctx.shared.unchanged():
                return self._nack(work, "need_full_model", "the shared reference changed while the gradient was taken (its round was over)")
            update = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in update_template(ctx.model, "gradient").items()}
        else:
            raise ElasticError(f"unknown work mode {mode!r}; this worker knows train, delta and gradient")
        meta: dict[str, Any] = {"num_samples": result.num_samples, "loss": result.loss, "kind": update_kind(mode), "train_seconds": computed}
        encodings: dict[str, list[dict[str, Any]]] = {}
        buffers: BufferSet | None
        if chain:
            cast = self._cast_in_blocks(ctx, update, chain, work.job)
            if cast is not None:
                tensors, encodings = cast
                buffers = ctx.cast_sent = BufferSet(tensors)
            else:  # compressed on the device; the parts are new memory, sent as they are
                if ctx.compressor is None or ctx.compressor.chain != chain:
                    ctx.compressor = chain.compressor()
                tensors, encodings = ctx.compressor.compress(update)
                buffers = None
        elif mode != "gradient" and self.device.type == "cpu":  # sent straight from the parameters
            buffers = ctx.sent = BufferSet(update)
            tensors = buffers.tensors
        else:
            buffers = self.outbox.copy_of(update)
            tensors = buffers.tensors
        msg = Message(
            MsgType.UPDATE,
            job=work.job,
            round=work.round,
            version=work.version,
            sender=self.worker_id,
            key=f"{self.worker_id}/{work.job}/{work.round}",
            meta=meta,
            tensors={k: WireTensor.from_tensor(v) for k, v in tensors.items()},
            encodings=encodings,
        )
        return Result(msg, buffers)

    def _cast_in_blocks(
        self, ctx: _JobContext, update: dict[str, torch.Tensor], chain: CodecChain, job: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, list[dict[str, Any]]]] | None:
        """A one-cast chain (fp16, bf16) on the CPU: each tensor is cast a block at a
        time (the codec's own ``encode``, so its clamping too) into parts kept for the
        job, which lie in the shared-memory segment when there is one. The update then
        leaves with no copy, and the cast is its only pass; the chain's way is a cast
        and a clamp over the whole tensor, then a copy into the segment. None when the
        chain is anything else."""
        if self.device.type != "cpu":
            return None
        stage = chain.cast
        if stage is None or not all(t.numel() and stage.accepts(t) for t in update.values()):
            return None
        narrow = type(stage).cast_from
        like = {f"{k}{SEP}x": torch.empty(t.numel(), dtype=narrow, device="meta") for k, t in update.items()}
        if ctx.cast_sent is not None and not ctx.cast_sent.free:
            ctx.cast_out = None  # the last update still reads them: leave it that memory
        out = self.placer(like, job) if self.placer is not None else None
        if out is None:
            out = ctx.cast_out if ctx.cast_out is not None and BufferSet(ctx.cast_out).fits(like) else {k: torch.empty(t.shape, dtype=narrow) for k, t in like.items()}
        ctx.cast_out = out
        for name, tensor in update.items():
            flat, target = tensor.detach().reshape(-1), out[f"{name}{SEP}x"]
            for start in range(0, flat.numel(), WIDEN_BLOCK):
                stage.encode_into(flat[start : start + WIDEN_BLOCK], target[start : start + WIDEN_BLOCK])
        return dict(out), {name: chain.cast_record(tensor) for name, tensor in update.items()}

    def _chain(self, ctx: _JobContext, work: Message) -> CodecChain:
        """The job's update codec chain, parsed once (again only when it changes)."""
        stages = tuple(str(c) for c in work.meta.get("codecs", ()))
        if ctx.chain is None or ctx.chain.stages != stages:
            ctx.chain, ctx.compressor = CodecChain(self.plugins.codecs, stages), None
        return ctx.chain

    def _into_segment(self, model: torch.nn.Module, mode: str, job: str) -> None:
        """Rebind the weights the update will be sent from into the shared-memory
        segment (once; they stay there while each update is released in time): the
        model is then loaded into it and the update leaves with no copy."""
        placer = self.placer
        if placer is None:
            return
        weights = update_template(model, mode)
        placed = placer({k: v.detach() for k, v in weights.items()}, job)
        if placed is None:
            return
        with torch.no_grad():
            for name, tensor in weights.items():
                target = placed[name]
                if tensor.data_ptr() != target.data_ptr():
                    target.copy_(tensor.detach())
                    tensor.data = target

    def _from_reference(self, ctx: _JobContext, work: Message) -> dict[str, WireTensor] | tuple[str, str]:
        """The model this WORK stands for, when it comes down as a delta against the
        reference we hold (``delta_from``), whole, or to be read from the coordinator's
        shared memory (``shared``); else the NACK's reason and detail."""
        floats = {k: (tuple(t.shape), t.dtype) for k, t in update_template(ctx.model, "train").items()}
        others = {k: wt for k, wt in work.tensors.items() if k not in floats and "#" not in k}
        # Taking a gradient leaves the parameters as they came, so they can hold the
        # reference themselves: no model-sized copy into the model each round.
        # Buffers (a task may update running statistics) keep a copy of their own.
        in_params = update_template(ctx.model, "gradient") if work.meta["mode"] == "gradient" and self.device.type == "cpu" else {}
        if "shared" in work.meta:  # on the coordinator's host: read where it lies
            ctx.reference_version = None  # until it is known whole
            ctx.shared = ctx.shared or SharedReader()
            try:
                why = self._read_shared(ctx, work, floats, in_params)
            except ProtocolError as exc:
                return "no_shared_reference", f"cannot read the coordinator's shared reference: {exc.detail}; send the model over the socket"
            if why is not None:
                return "need_full_model", why
        elif "delta_from" not in work.meta:  # the whole reference: keep a copy to apply deltas to
            self._leave_shared(ctx, in_params)
            ctx.reference = {}
            for k, wt in work.tensors.items():
                if k in in_params and tuple(in_params[k].shape) == wt.shape and in_params[k].dtype == wt.dtype:
                    with torch.no_grad():
                        wt.copy_to(in_params[k])
                    ctx.reference[k] = in_params[k].detach()
                elif k in floats:
                    ctx.reference[k] = wt.to_tensor().clone()
        elif ctx.reference is None or ctx.reference_version != work.meta["delta_from"]:
            return "need_full_model", f"this worker holds version {ctx.reference_version}, not {work.meta.get('delta_from')}; send the whole model"
        else:
            if ctx.viewing:  # deltas are added in place: to memory of our own
                self._leave_shared(ctx, in_params)
                ctx.reference = {k: in_params[k].detach() for k in ctx.reference}
            delta = expand(work, self.plugins.codecs, floats)
            for name, ref in ctx.reference.items():
                if name in delta:
                    delta[name].add_to(ref)  # widened on the way when the chain is a cast
        assert ctx.reference is not None  # every branch above made or checked it
        ctx.reference_version = work.version
        return others | {k: WireTensor.from_tensor(v) for k, v in ctx.reference.items()}

    def _read_shared(self, ctx: _JobContext, work: Message, floats: dict[str, tuple[tuple[int, ...], torch.dtype]], in_params: dict[str, torch.Tensor]) -> str | None:
        """The coordinator's reference, from its segment: a gradient is taken on it
        where it lies (the parameters are rebound to views of it, once; ``_run``
        checks afterwards that it did not change meanwhile); anything else copies
        it. None when done, else why not."""
        assert ctx.shared is not None
        if in_params and set(in_params) == set(floats):
            views = ctx.shared.view(work.meta["shared"], in_params)
            with torch.no_grad():
                for name, param in in_params.items():
                    if param.data_ptr() != views[name].data_ptr():
                        param.data = views[name]
            ctx.reference = {k: p.detach() for k, p in in_params.items()}
            ctx.viewing = True
            return ctx.shared.stable(work.version)
        self._leave_shared(ctx, in_params)
        if ctx.reference is None or {k: (tuple(t.shape), t.dtype) for k, t in ctx.reference.items()} != floats:
            ctx.reference = {k: in_params[k].detach() if k in in_params else torch.empty(shape, dtype=dtype) for k, (shape, dtype) in floats.items()}
        with torch.no_grad():
            return ctx.shared.copy_into(work.meta["shared"], ctx.reference, work.version)

    @staticmethod
    def _leave_shared(ctx: _JobContext, in_params: dict[str, torch.Tensor]) -> None:
        """Parameters that view the shared reference get memory of their own before
        anything writes them, and the mapping is dropped: a page written here would
        no longer follow the coordinator's, so a later view maps afresh."""
        if not ctx.viewing:
            return
        with torch.no_grad():
            for param in in_params.values():
                param.data = param.data.clone()
        ctx.viewing = False
        ctx.shared = SharedReader() if ctx.shared is not None else None

    def _nack(self, work: Message, reason: str, detail: str) -> Result:
        log.warning("cannot do work job=%s round=%d reason=%s detail=%s", work.job, work.round, reason, detail)
        return Result(Message(MsgType.NACK, job=work.job, round=work.round, version=work.version, sender=self.worker_id, key=work.key, meta={"reason": reason, "detail": detail}))
