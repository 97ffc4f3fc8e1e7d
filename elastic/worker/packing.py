"""Packing a computed update into the UPDATE that carries it: through the job's
codec chain (a one-cast chain a block at a time, into memory that lies where it is
sent from), straight from the parameters, or through a host copy (an update on a
GPU). The frames alias the memory returned with it (``Result.buffers``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from elastic.compression.chain import SEP, CodecChain, CodecLookup
from elastic.wire.buffers import BufferPool, BufferSet
from elastic.wire.header import Message, MsgType
from elastic.wire.tensors import WIDEN_BLOCK, WireTensor
from elastic.worker.intake import JobContext, Placer

__all__ = ["Packer", "Result"]


@dataclass
class Result:
    """What to send back: an UPDATE (aliasing ``buffers``) or a NACK."""

    message: Message
    buffers: BufferSet | None = None


class Packer:
    """Packs one worker's updates (``worker_id`` names them)."""

    def __init__(self, codecs: CodecLookup, device: torch.device, worker_id: str) -> None:
        self.codecs = codecs
        self.device = device
        self.worker_id = worker_id
        # Host copies of updates computed on a GPU (pinned), reused once sent.
        self.outbox = BufferPool(pin=device.type == "cuda")
        self.placer: Placer | None = None

    def pack(
        self,
        ctx: JobContext,
        work: Message,
        update: dict[str, torch.Tensor],
        meta: dict[str, Any],
        from_parameters: bool,
    ) -> Result:
        """The UPDATE answering ``work``. ``from_parameters``: ``update`` is the
        model's own parameters, which may be sent from where they lie (on a CPU)."""
        chain = self.chain(ctx, work)
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
        elif from_parameters and self.device.type == "cpu":  # sent straight from the parameters
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
            key=work.key,  # the coordinator's (worker/job/round, and /client for a virtual client)
            meta=meta,
            tensors={k: WireTensor.from_tensor(v) for k, v in tensors.items()},
            encodings=encodings,
        )
        return Result(msg, buffers)

    def _cast_in_blocks(
        self, ctx: JobContext, update: dict[str, torch.Tensor], chain: CodecChain, job: str
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
        like = {
            f"{k}{SEP}x": torch.empty(t.numel(), dtype=narrow, device="meta")
            for k, t in update.items()
        }
        if ctx.cast_sent is not None and not ctx.cast_sent.free:
            ctx.cast_out = None  # the last update still reads them: leave it that memory
        out = self.placer(like, job) if self.placer is not None else None
        if out is None:
            out = (
                ctx.cast_out
                if ctx.cast_out is not None and BufferSet(ctx.cast_out).fits(like)
                else {k: torch.empty(t.shape, dtype=narrow) for k, t in like.items()}
            )
        ctx.cast_out = out
        for name, tensor in update.items():
            flat, target = tensor.detach().reshape(-1), out[f"{name}{SEP}x"]
            for start in range(0, flat.numel(), WIDEN_BLOCK):
                stage.encode_into(
                    flat[start : start + WIDEN_BLOCK], target[start : start + WIDEN_BLOCK]
                )
        return dict(out), {name: chain.cast_record(tensor) for name, tensor in update.items()}

    def chain(self, ctx: JobContext, work: Message) -> CodecChain:
        """The job's update codec chain, parsed once (again only when it changes)."""
        stages = tuple(str(c) for c in work.meta.get("codecs", ()))
        if ctx.chain is None or ctx.chain.stages != stages:
            ctx.chain, ctx.compressor = CodecChain(self.codecs, stages), None
        return ctx.chain
