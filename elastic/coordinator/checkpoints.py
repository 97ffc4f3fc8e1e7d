"""Atomic checkpoints: write to a temporary file, fsync, rename, fsync the directory.

A reader therefore sees either the previous checkpoint or the new one, never a torn
file. Checkpoints are ``torch.save`` files of plain data and tensors, loaded with
``weights_only=True`` (no pickled code runs on load). This is disk, not the wire.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from elastic.errors import CheckpointError, Fenced

__all__ = ["CheckpointStore", "atomic_write", "write_safetensors"]

log = logging.getLogger("elastic.checkpoints")
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def atomic_write(path: Path, write: Any, fence: Callable[[], bool | None] | None = None) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, then publish it atomically.

    ``fence``, when given, is asked right before publishing; anything but True
    discards the file and raises ``Fenced`` (a coordinator that no longer leads
    must not publish a checkpoint).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if fence is not None and fence() is not True:
            tmp.unlink(missing_ok=True)
            raise Fenced(
                f"not publishing {path}: this coordinator could not confirm it still leads"
            )
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write {path}: {exc.strerror}; check the disk and permissions"
        ) from exc


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(f: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` to ``f`` in the safetensors format, straight from their memory.

    ``safetensors.torch.save`` builds the whole file as one bytes object first: a
    model-sized allocation at the moment the coordinator's memory peaks. Here each
    tensor goes from its own storage to the file (a contiguous CPU copy only for a
    tensor that is not one already).
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset, ordered = 0, []
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu" or not t.is_contiguous():
            t = t.to("cpu").contiguous()
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {t.dtype} as safetensors")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        ordered.append(t)
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the format's own writer does
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for t in ordered:
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


class CheckpointStore:
    """The checkpoints of one job, in ``<root>/<job_id>/ckpt-<round>.pt``."""

    def __init__(self, root: Path, job_id: str, keep: int = 3) -> None:
        self.dir = Path(root) / job_id
        self.keep = keep

    def paths(self) -> list[tuple[int, Path]]:
        """(round, path) of every checkpoint, oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(
        self, round_: int, state: dict[str, Any], fence: Callable[[], bool | None] | None = None
    ) -> Path:
        path = self.dir / f"ckpt-{round_:08d}.pt"
        atomic_write(path, lambda f: torch.save(state, f), fence)
        for _, old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads; an unreadable one is skipped with a warning."""
        for round_, path in reversed(self.paths()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a damaged file must not stop a resume
                log.warning(
                    "skipping unreadable checkpoint path=%s round=%d error=%s", path, round_, exc
                )
        return None
