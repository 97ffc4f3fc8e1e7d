"""Atomic checkpoints: write to a temporary file, fsync, rename, fsync the directory.

A reader therefore sees either the previous checkpoint or the new one, never a torn
file. Checkpoints are ``torch.save`` files of plain data and tensors, loaded with
``weights_only=True`` (no pickled code runs on load). This is disk, not the wire.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from elastic.errors import CheckpointError, Fenced

__all__ = ["CheckpointStore", "atomic_write"]

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
            raise Fenced(f"not publishing {path}: this coordinator could not confirm it still leads")
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {exc.strerror}; check the disk and permissions") from exc


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

    def save(self, round_: int, state: dict[str, Any], fence: Callable[[], bool | None] | None = None) -> Path:
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
                log.warning("skipping unreadable checkpoint path=%s round=%d error=%s", path, round_, exc)
        return None
