"""The model sent down compressed: a delta against the version a worker holds.

For synchronous rounds (every participant of a round gets the same version), when
a job sets ``[compression] model = [...]``. The coordinator keeps the *reference*:
the model as the workers hold it. Each round the reference moves toward the model
by one compressed delta; with a lossy chain it lags the exact model a little, and
the next delta carries that lag too, so the error never piles up (error feedback on
the way down). A worker known to hold the previous reference gets the delta; any
other (new, or back after missing rounds) gets the whole reference. Workers train
from the reference, so relative updates are taken against it.

Memory: one reference copy, plus the codecs' residuals, whatever the number of
workers; per worker only the version it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from elastic.training import update_template
from elastic.wire.buffers import BufferSet
from elastic.wire.compression import Compressor, expand
from elastic.wire.messages import Message, MsgType, WireTensor

__all__ = ["Downlink"]

log = logging.getLogger("elastic.rounds")


class Downlink:
    def __init__(self, model: torch.nn.Module, chain: Sequence[str], codecs: Any) -> None:
        self.codecs = codecs
        self.compressor = Compressor(codecs, chain)
        floats = update_template(model, "train")
        self.template = {k: (tuple(t.shape), t.dtype) for k, t in floats.items()}
        self.reference: dict[str, torch.Tensor] | None = None
        self.version = -1  # the model version the reference stands for
        self.held: dict[str, int] = {}  # worker -> reference version it holds
        self._delta: tuple[dict[str, WireTensor], dict[str, list[dict[str, Any]]], int] | None = None
        self.sends = BufferSet({}, busy=False)  # sends that alias the reference's memory

    def advance(self, model: torch.nn.Module, version: int) -> None:
        """Move the reference to the model at ``version`` (a no-op if it is there)."""
        floats = {k: t.detach() for k, t in update_template(model, "train").items()}
        if self.reference is None:
            self.reference = {k: t.clone() for k, t in floats.items()}
            self.version = version
            return
        if version == self.version:
            return
        diff = {k: floats[k] - self.reference[k] for k in floats}
        parts, encodings = self.compressor.compress(diff)
        wire = {k: WireTensor.from_tensor(v) for k, v in parts.items()}
        decoded = expand(Message(MsgType.WORK, tensors=dict(wire), encodings=encodings), self.codecs, self.template)
        if not self.sends.free:  # a queued WORK still reads the reference: leave it that memory
            self.reference = {k: t.clone() for k, t in self.reference.items()}
            self.sends = BufferSet({}, busy=False)
        for name, t in self.reference.items():
            decoded[name].add_to(t)  # widened on the way when the chain is a cast
        self._delta = (wire, encodings, self.version)
        self.version = version

    def work(self, worker: str, state: dict[str, torch.Tensor]) -> tuple[dict[str, WireTensor], dict[str, list[dict[str, Any]]], dict[str, Any]]:
        """(tensors, encodings, extra meta) of the WORK for ``worker``; ``state`` is the
        model's state dict (tensors that are not floating point always go whole)."""
        assert self.reference is not None
        tensors = {k: WireTensor.from_tensor(v) for k, v in state.items() if k not in self.reference}
        held = self.held.get(worker)
        self.held[worker] = self.version
        if held == self.version:  # e.g. a round run again: nothing new to send
            return tensors, {}, {"downlink": True, "delta_from": self.version}
        if self._delta is not None and held == self._delta[2]:
            wire, encodings, base = self._delta
            return tensors | wire, encodings, {"downlink": True, "delta_from": base}
        tensors.update({k: WireTensor.from_tensor(v) for k, v in self.reference.items()})
        return tensors, {}, {"downlink": True}

    def forget(self, worker: str) -> None:
        """The worker does not hold what we thought (it said so, or left): send it all next time."""
        self.held.pop(worker, None)
