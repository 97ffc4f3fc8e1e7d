"""Where a worker trains, and how tensors get there.

Received tensors are ZeroMQ frames in host memory. On CUDA they are staged through
pinned host buffers (reused round after round) so the copy to the GPU is a fast
asynchronous DMA; updates come back through pinned buffers too (``updates.py``).
"""

from __future__ import annotations

import torch

from elastic.errors import ConfigError
from elastic.wire.buffers import reusable

__all__ = ["resolve_device", "describe_device", "HostStaging"]


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec!r} is not a device; use auto, cpu or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ConfigError(f"--device {spec}: only cpu and cuda devices are supported")
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    return "cpu"


class HostStaging:
    """Pinned host buffers by name, reused while shapes stay the same."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return reusable(self._buffers, name, like, device=torch.device("cpu"), pin=self.pinned)
