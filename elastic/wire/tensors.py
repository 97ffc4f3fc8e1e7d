"""Tensors as they travel (``WireTensor``), and the wire's dtypes as torch dtypes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from elastic.wire.header import DTYPE_SIZES

__all__ = ["WireTensor", "DTYPES", "DTYPE_NAMES", "WIDEN_BLOCK"]

# The wire's dtypes (``header.DTYPE_SIZES``, the one table) by their wire name: each
# name is torch's own.
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_SIZES}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass
class WireTensor:
    """A tensor as it travels: its dtype and shape, and its elements as 1-D chunks.

    On the receiving side each chunk is a ``torch.frombuffer`` view over one ZeroMQ
    frame, so nothing is copied until the tensor is folded somewhere. Folding chunk by
    chunk (``copy_to``, ``add_to``) keeps the receiver's memory at one model.

    The chunks of a tensor that came through a cast codec (fp16, bf16) hold the
    narrower dtype as received; every method here widens them to ``dtype`` on the
    way, so no decoded copy is ever made unless ``to_tensor`` asks for one.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: list[torch.Tensor] = field(default_factory=list)
    # The chunks lie in a peer's shared-memory segment (``elastic.wire.shm``): keeping
    # them costs this process no memory of its own.
    shared: bool = False

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> WireTensor:
        """Wrap a tensor for sending (moved to contiguous host memory if it is not)."""
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        flat = t.reshape(-1)
        return cls(dtype=t.dtype, shape=tuple(t.shape), chunks=[flat] if flat.numel() else [])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def iter_chunks(
        self, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(element_offset, chunk)`` pairs in order; with ``start``/``stop``,
        only the elements in that range (chunks cut to it)."""
        stop = self.numel if stop is None else stop
        offset = 0
        for chunk in self.chunks:
            end = offset + chunk.numel()
            if end > start and offset < stop:
                low, high = max(start, offset), min(stop, end)
                yield (
                    low,
                    chunk if (low, high) == (offset, end) else chunk[low - offset : high - offset],
                )
            if end >= stop:
                return
            offset = end

    def to_tensor(self) -> torch.Tensor:
        """The whole tensor. Zero-copy for one chunk; one concatenation otherwise."""
        if not self.chunks:
            return torch.empty(self.shape, dtype=self.dtype)
        if self.chunks[0].dtype != self.dtype:  # widened into one new tensor, in one pass
            out = torch.empty(self.shape, dtype=self.dtype)
            self.copy_to(out)
            return out
        flat = self.chunks[0] if len(self.chunks) == 1 else torch.cat(self.chunks)
        return flat.view(self.shape)

    def copy_to(self, target: torch.Tensor) -> None:
        """Copy into ``target`` (same number of elements), chunk by chunk."""
        flat = _flat_view(target, self.numel)
        for offset, chunk in self.iter_chunks():
            flat[offset : offset + chunk.numel()].copy_(chunk, non_blocking=True)

    def add_to(
        self, target: torch.Tensor, alpha: float = 1.0, start: int = 0, stop: int | None = None
    ) -> None:
        """``target += alpha * self``, chunk by chunk (``target`` may be another dtype);
        with ``start``/``stop``, over those elements only."""
        flat = _flat_view(target, self.numel)
        scratch: torch.Tensor | None = None
        for offset, chunk in self.iter_chunks(start, stop):
            if chunk.dtype == flat.dtype:
                flat[offset : offset + chunk.numel()].add_(chunk, alpha=alpha)
                continue
            # A mixed-dtype add_ takes torch's unvectorised casting loop (6x slower
            # at 25M fp16 elements): widen a cache-sized block, then add it.
            if scratch is None:  # as big as the largest block this range can hold
                scratch = torch.empty(
                    min(WIDEN_BLOCK, (self.numel if stop is None else stop) - start),
                    dtype=flat.dtype,
                )
            for at, block in _blocks(chunk):
                wide = scratch[: block.numel()].copy_(block)
                flat[offset + at : offset + at + block.numel()].add_(wide, alpha=alpha)

    def scale_to(
        self, target: torch.Tensor, alpha: float = 1.0, start: int = 0, stop: int | None = None
    ) -> None:
        """``target = alpha * self``, chunk by chunk (one pass: no zeroing first);
        with ``start``/``stop``, over those elements only."""
        flat = _flat_view(target, self.numel)
        for offset, chunk in self.iter_chunks(start, stop):
            if chunk.dtype == flat.dtype:
                torch.mul(chunk, alpha, out=flat[offset : offset + chunk.numel()])
                continue
            # Widened first (alpha * x in half precision could overflow), a block at
            # a time so that the multiply finds it in cache.
            for at, block in _blocks(chunk):
                flat[offset + at : offset + at + block.numel()].copy_(block).mul_(alpha)

    def is_finite(self) -> bool:
        """True when no element is NaN or ±Inf (always true for integer dtypes)."""
        if not self.dtype.is_floating_point:
            return True
        for chunk in self.chunks:
            # One pass, no temporary, exact in any dtype (a sum may overflow, and
            # torch sums half precision through a float copy): NaN makes both ends
            # NaN, an infinity is one of them.
            low, high = torch.aminmax(chunk)
            if not (math.isfinite(low) and math.isfinite(high)):
                return False
        return True


# Elements widened at a time on the way into a wider tensor: a 4 MiB float32 block
# stays in cache between the cast and the add (25M fp16 added to float32: 29 -> 4.4 ms).
WIDEN_BLOCK = 1 << 20


def _blocks(chunk: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, chunk.numel(), WIDEN_BLOCK):
        yield start, chunk[start : start + WIDEN_BLOCK]


def _flat_view(target: torch.Tensor, numel: int) -> torch.Tensor:
    if target.numel() != numel:
        raise ValueError(f"target has {target.numel()} elements, the wire tensor {numel}")
    if not target.is_contiguous():
        raise ValueError("target tensor must be contiguous")
    return target.view(-1)
