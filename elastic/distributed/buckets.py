"""Gradients all-reduced in buckets while the backward pass still runs, as DDP does,
but with no hold on the forward pass: a task's loss may use its model any way it
likes (call it, or read its parameters), and the model stays the task's own.

Each parameter's ``.grad`` is a view into its bucket's flat buffer, so autograd
accumulates straight into what is sent. When a bucket's last gradient is in (a
post-accumulate hook), the bucket is all-reduced asynchronously, buckets always in
the same order on every rank (a collective out of order would pair the wrong
tensors), so communication overlaps the rest of the backward pass. ``finish``
sends what no gradient reached (unused parameters) and waits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["BucketedAllReduce", "BUCKET_BYTES"]

BUCKET_BYTES = 25 << 20  # DDP's default bucket size


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.flat = torch.zeros(
            sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device
        )
        self.waiting = len(params)
        self.work: Any = None


class BucketedAllReduce:
    """Sums the gradients of ``params`` over the default process group in buckets of
    about ``bucket_bytes``, overlapped with backward. Use: ``backward()``, then
    ``finish()``; the gradients then hold the sum over ranks."""

    def __init__(
        self, params: Iterable[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES
    ) -> None:
        trained = [p for p in params if p.requires_grad]
        self.buckets: list[_Bucket] = []
        group: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(trained):  # gradients come last layer first
            kind = (group[0].dtype, group[0].device) if group else None
            if group and (size >= bucket_bytes or (p.dtype, p.device) != kind):
                self.buckets.append(_Bucket(group))
                group, size = [], 0
            group.append(p)
            size += p.numel() * p.element_size()
        if group:
            self.buckets.append(_Bucket(group))
        self._bucket_of: dict[torch.nn.Parameter, _Bucket] = {}
        self._hooks = []
        for bucket in self.buckets:
            offset = 0
            for p in bucket.params:
                view = bucket.flat[offset : offset + p.numel()].view_as(p)
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view  # autograd accumulates into the bucket itself
                offset += p.numel()
                self._bucket_of[p] = bucket
                self._hooks.append(p.register_post_accumulate_grad_hook(self._ready))
        self._next = 0  # the first bucket not yet sent

    def _ready(self, param: torch.Tensor) -> None:
        bucket = self._bucket_of[param]  # type: ignore[index]
        bucket.waiting -= 1
        if bucket.waiting == 0:
            self._send_ready()

    def _send_ready(self, everything: bool = False) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if bucket.waiting > 0 and not everything:
                return
            bucket.work = dist.all_reduce(bucket.flat, async_op=True)
            self._next += 1

    def finish(self) -> None:
        """Send what is left, wait for every bucket, and make ready for the next step."""
        self._send_ready(everything=True)
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.work, bucket.waiting = None, len(bucket.params)
        self._next = 0

    def close(self) -> None:
        """Remove the hooks (the gradients stay views of the buckets' memory)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
