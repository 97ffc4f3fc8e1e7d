"""Builds the tensors of an update in reused memory.

The model's state before training is kept in persistent device buffers; the update
(trained minus sent weights, or gradients) is written into host buffers from a pool
(pinned on CUDA) that are reused once ZeroMQ has sent them. A round therefore
allocates nothing model-sized, and an update still in flight is never overwritten.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from elastic.wire.buffers import BufferPool, BufferSet, reusable
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
        return {name: reusable(self._before, name, t).copy_(t.detach()) for name, t in tensors.items()}

    def delta(self, after: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]) -> BufferSet:
        """``after - before`` in host buffers ready to send."""
        out = self.pool.acquire(before)
        for name, b in before.items():
            a = after[name].detach()
            if self.device.type == "cpu":
                torch.sub(a, b, out=out.tensors[name])
            else:
                scratch = reusable(self._scratch, name, b)
                torch.sub(a, b, out=scratch)
                out.tensors[name].copy_(scratch, non_blocking=True)
        self._sync()
        return out

    def delta_from_wire(self, after: Mapping[str, torch.Tensor], sent: Mapping[str, WireTensor]) -> BufferSet:
        """``after - sent`` on CPU, straight from the received frames (no copy kept aside)."""
        out = self.pool.acquire(after)
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

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
