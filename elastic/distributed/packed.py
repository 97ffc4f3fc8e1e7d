"""A collective checkpoint as one flat byte tensor and its layout, so that it travels
like any big update: whole, or in parts the coordinator grants (``wire/parts.py``),
whatever tensors the optimizer's state holds.

The layout lists ``[name, dtype, shape]`` in order; each tensor starts at the next
multiple of 8 bytes (so a view of any dtype is aligned). The receiver checks the
layout before it reads a byte (``unpack`` with ``check``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from elastic.wire.tensors import DTYPE_NAMES, DTYPES

__all__ = ["NAME", "Layout", "check", "pack", "layout_bytes", "unpack"]

NAME = "checkpoint"  # the one tensor a checkpoint UPDATE carries
ALIGN = 8
Layout = list[list]  # [[name, dtype name, shape], ...]


def _extent(dtype: torch.dtype, shape: list[int]) -> int:
    return math.prod(shape) * dtype.itemsize


def layout_bytes(layout: Layout) -> list[int]:
    """Each entry's first byte, and (last) the total."""
    starts, at = [], 0
    for _, dtype, shape in layout:
        at = -(-at // ALIGN) * ALIGN
        starts.append(at)
        at += _extent(DTYPES[dtype], shape)
    return [*starts, at]


def pack(
    tensors: Mapping[str, torch.Tensor], buffer: Callable[[int], torch.Tensor]
) -> tuple[Layout, torch.Tensor]:
    """The layout of ``tensors`` and one uint8 tensor holding them, in memory
    ``buffer(total_bytes)`` gives (pooled, pinned: the sender's)."""
    layout = [[name, DTYPE_NAMES[t.dtype], list(t.shape)] for name, t in tensors.items()]
    *starts, total = layout_bytes(layout)
    flat = buffer(total)
    for t, start in zip(tensors.values(), starts, strict=True):
        if t.numel():
            flat[start : start + t.numel() * t.element_size()].view(t.dtype).copy_(
                t.detach().reshape(-1)
            )
    return layout, flat


def unpack(layout: Layout, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of each tensor in ``flat`` (a checked layout, its total bytes)."""
    *starts, _ = layout_bytes(layout)
    out = {}
    for (name, dtype, shape), start in zip(layout, starts, strict=True):
        kind = DTYPES[dtype]
        out[name] = flat[start : start + _extent(kind, shape)].view(kind).view(shape)
    return out


def check(layout: object, model: Mapping[str, torch.Tensor], most: int) -> tuple[Layout, int] | str:
    """The layout and its total bytes, or what is wrong with it: every model tensor
    once with its shape and dtype, optimizer tensors (``optimizer/...``) no bigger
    than the biggest parameter, nothing else, at most ``most`` bytes in all."""
    if not isinstance(layout, list) or not layout:
        return "collective.tensors must list [name, dtype, shape] entries"
    largest = max((t.numel() for t in model.values()), default=0)
    seen: set[str] = set()
    for entry in layout:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and entry[1] in DTYPES
            and isinstance(entry[2], list)
            and all(type(d) is int and d >= 0 for d in entry[2])
        ):
            return f"bad layout entry {entry!r:.100}"
        name, dtype, shape = entry
        if name in seen:
            return f"{name!r} is in the layout twice"
        seen.add(name)
        if name in model:
            target = model[name]
            if list(target.shape) != shape or DTYPE_NAMES.get(target.dtype) != dtype:
                return f"{name}: {shape} {dtype}, the model has {list(target.shape)} {target.dtype}"
        elif not name.startswith("optimizer/") or math.prod(shape) > largest:
            return f"unexpected tensor {name!r} in a checkpoint"
    missing = set(model) - seen
    if missing:
        return f"the checkpoint lacks {sorted(missing)[:5]}"
    total = layout_bytes(layout)[-1]
    if total > most:
        return f"a checkpoint of {total} bytes; at most {most} for this model"
    return layout, total
