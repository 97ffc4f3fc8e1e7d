"""A collective member's training state (model, optimizer, position in the data),
and handing it from one rank to all the others by broadcast.

The optimizer's state travels as its tensors (named ``optimizer/<param>/<key>``) and
a layout: the rest of its ``state_dict`` in msgpack, each tensor's place marked with
its name, shape and dtype, so a member with no optimizer state yet (a joiner) can
receive one.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import torch.distributed as dist

from elastic.distributed.sampling import Position
from elastic.wire.tensors import DTYPE_NAMES, DTYPES

__all__ = ["MemberState", "optimizer_tensors", "load_optimizer", "share_state", "NoState"]

PREFIX = "optimizer/"
STEPS_TIMED = 100  # the steps a member's median step time is taken over


class NoState(RuntimeError):
    """No member of a generation holds training state (all of them joined afresh)."""


@dataclass
class MemberState:
    """What a member keeps between generations of a job."""

    optimizer: torch.optim.Optimizer
    position: Position = field(default_factory=Position)
    has_state: bool = False  # trained, or given the state: it may be a broadcast's source
    loss: float = 0.0  # the last step's mean loss over all ranks
    samples: int = 0  # ... and its samples over all ranks
    # The newest steps' seconds in this generation, the first two (warm-up) left out.
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=STEPS_TIMED))

    @property
    def step_seconds(self) -> float:
        """The median of the newest steps (0 before any)."""
        return statistics.median(self.durations) if self.durations else 0.0


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The optimizer's state as a layout (msgpack) and its tensors by name."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for param, values in state["state"].items():
        entry: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                name = f"{PREFIX}{param}/{key}"
                tensors[name] = value
                entry[key] = {
                    "tensor": name,
                    "shape": list(value.shape),
                    "dtype": DTYPE_NAMES[value.dtype],
                }
            else:
                entry[key] = {"value": value}
        entries[str(param)] = entry
    layout = msgpack.packb({"groups": state["param_groups"], "state": entries})
    return layout, tensors


def load_optimizer(
    optimizer: torch.optim.Optimizer, layout: bytes, tensors: dict[str, torch.Tensor]
) -> None:
    """Load what ``optimizer_tensors`` gave into ``optimizer``."""
    saved = msgpack.unpackb(layout, strict_map_key=False)
    state = {
        int(param): {
            key: tensors[spec["tensor"]] if "tensor" in spec else spec["value"]
            for key, spec in entry.items()
        }
        for param, entry in saved["state"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": saved["groups"]})


def _layout_specs(layout: bytes) -> list[tuple[str, list[int], torch.dtype]]:
    saved = msgpack.unpackb(layout, strict_map_key=False)
    return [
        (spec["tensor"], spec["shape"], DTYPES[spec["dtype"]])
        for entry in saved["state"].values()
        for spec in entry.values()
        if "tensor" in spec
    ]


def share_state(
    model: torch.nn.Module, member: MemberState, device: torch.device
) -> tuple[int, Position]:
    """Every rank ends with the state of the source: the lowest rank among those
    holding state at the lowest step (the last step all holders completed). Returns
    the source rank and the position. ``NoState`` when nobody holds any."""
    world = dist.get_world_size()
    mine = torch.tensor(
        [
            int(member.has_state),
            member.position.step,
            member.position.epoch,
            member.position.offset,
        ],
        dtype=torch.int64,
        device=device,
    )
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    held = [(int(t[1]), rank) for rank, t in enumerate(everyone) if int(t[0])]
    if not held:
        raise NoState("no member of this generation holds the training state")
    _, source = min(held)
    info = everyone[source].tolist()
    position = Position(*info[1:])
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, source)
    if dist.get_rank() == source:
        layout, tensors = optimizer_tensors(member.optimizer)
        size = torch.tensor([len(layout)], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, source)
    if dist.get_rank() == source:
        data = torch.frombuffer(bytearray(layout), dtype=torch.uint8).to(device)
    else:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, source)
    layout = bytes(data.cpu().numpy().tobytes())
    received = {}
    for name, shape, dtype in _layout_specs(layout):
        tensor = (
            tensors[name].to(device)
            if dist.get_rank() == source
            else torch.empty(shape, dtype=dtype, device=device)
        )
        dist.broadcast(tensor, source)
        received[name] = tensor
    if dist.get_rank() != source:
        load_optimizer(member.optimizer, layout, received)
    member.position, member.has_state = position, True
    return source, position
