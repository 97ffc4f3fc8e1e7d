"""Builds the tensors of an update in reused memory.

The model's state before training is kept in persistent device buffers; the update
(trained minus sent weights, or gradients) is written into host buffers from a pool
(pinned on CUDA) that are reused once ZeroMQ has sent them. A round therefore
allocates nothing model-sized, and an update still in flight is never overwritten.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from elastic.wire.buffers import BufferPool, BufferSet
from elastic.wire.messages import WireTensor

__all__ = ["UpdateBuilder"]


class UpdateBuilder:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = BufferPool(pin=device.type == "cuda")
        self._before: dict[str, torch.Tensor] = {}
        self._scratch: dict[str, torch.Tensor] = {}

    def remember(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of ``tensors`` (on their device) in buffers kept for the next call."""
        for name, t in tensors.items():
            buf = self._before.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
                buf = self._before[name] = torch.empty_like(t, memory_format=torch.contiguous_format)
            buf.copy_(t.detach())
        return {name: self._before[name] for name in tensors}

    def delta(self, after: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]) -> BufferSet:
        """``after - before`` in host buffers ready to send."""
        out = self.pool.acquire(before)
        for name, b in before.items():
            a = after[name].detach()
            if self.device.type == "cpu":
                torch.sub(a, b, out=out.tensors[name])
            else:
                scratch = self._scratch_like(name, b)
                torch.sub(a, b, out=scratch)
                out.tensors[name].copy_(scratch, non_blocking=True)
        self._sync()
        return out

    def delta_from_wire(self, after: Mapping[str, torch.Tensor], sent: Mapping[str, WireTensor]) -> BufferSet:
        """``after - sent`` on CPU, straight from the received frames (no copy kept aside)."""
        out = self.pool.acquire({k: after[k] for k in after})
        for name, a in after.items():
            flat_a, flat_out = a.detach().reshape(-1), out.tensors[name].view(-1)
            for offset, chunk in sent[name].iter_chunks():
                end = offset + chunk.numel()
                torch.sub(flat_a[offset:end], chunk, out=flat_out[offset:end])
        return out

    def copy(self, tensors: Mapping[str, torch.Tensor]) -> BufferSet:
        """A host copy of ``tensors`` (gradients) ready to send."""
        out = self.pool.copy_of({k: v.detach() for k, v in tensors.items()})
        self._sync()
        return out

    def sent(self, buffers: BufferSet, tracker: object) -> None:
        """The message aliasing ``buffers`` was sent with this tracker (or not at all)."""
        buffers.attach(tracker)  # type: ignore[arg-type]
        buffers.release()

    def _scratch_like(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = self._scratch.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self._scratch[name] = torch.empty_like(like)
        return buf

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
