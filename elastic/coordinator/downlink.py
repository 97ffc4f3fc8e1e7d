"""The model sent down compressed: a delta against the version a worker holds.

For synchronous rounds (every participant of a round gets the same version), when
a job sets ``[compression] model = [...]``. The coordinator keeps the *reference*:
the model as the workers hold it. Each round the reference moves toward the model
by one compressed delta; with a lossy chain it lags the exact model a little, and
the next delta carries that lag too, so the error never piles up (error feedback on
the way down). A worker known to hold the previous reference gets the delta; any
other (new, or back after missing rounds) gets the whole reference. Workers train
from the reference, so relative updates are taken against it.

Workers on the coordinator's host (with the shared-memory path on) are sent no
tensors at all: the reference lies in a ``/dev/shm`` segment they read where it is
(``SharedTensors``), which gives them bit for bit what the deltas would, with no
copy per worker and no delta to widen. The others get deltas as above.

With no chain (``exact``), a job whose workers take gradients keeps an exact copy
of the model in such a segment for its workers on this host, made when one takes
part: one copy a round for all of them, which they take gradients on where it lies,
instead of a copy into each one's segment and another into its parameters. Workers
elsewhere get the model as usual. It costs one model of ``/dev/shm``.

Memory: one reference copy, plus the codecs' residuals, whatever the number of
workers; per worker only the version it holds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from elastic.compression.chain import SEP, CodecChain, expand
from elastic.training import update_template
from elastic.wire.buffers import BufferSet
from elastic.wire.header import Message, MsgType
from elastic.wire.shared import SharedTensors
from elastic.wire.shm import SHM_MIN_BYTES
from elastic.wire.tensors import WIDEN_BLOCK, WireTensor

__all__ = ["Downlink"]

log = logging.getLogger("elastic.rounds")


class Downlink:
    def __init__(self, model: torch.nn.Module, chain: CodecChain, share: bool = False) -> None:
        self.chain = chain
        self.exact = not chain  # no compression: only workers on this host are served
        self.compressor = chain.compressor()
        # A chain that is one cast (``Codec.cast_from``, element by element): the
        # delta is then made a block at a time (``_cast_delta``).
        self.cast = chain.cast is not None
        floats = update_template(model, "train")
        self.template = {k: (tuple(t.shape), t.dtype) for k, t in floats.items()}
        self.reference: dict[str, torch.Tensor] | None = None
        self.version = -1  # the model version the reference stands for
        self.held: dict[str, int] = {}  # worker -> reference version it holds
        self._delta: tuple[dict[str, WireTensor], dict[str, list[dict[str, Any]]], int] | None = (
            None
        )
        self.sends = BufferSet({}, busy=False)  # sends that alias the reference's memory
        # The reference in shared memory for workers on this host (``share``: the
        # coordinator has the path on); None until made, or when there is no room.
        self.share = share
        self.shared: SharedTensors | None = None
        self.wire_only: set[str] = set()  # workers on this host that could not read it

    def advance(self, model: torch.nn.Module, version: int, wire: bool = True) -> None:
        """Move the reference to the model at ``version`` (a no-op if it is there).
        ``wire=False``: every member reads the shared reference, so a one-cast delta
        is not kept to be sent (one that joins later gets the whole reference)."""
        floats = {k: t.detach() for k, t in update_template(model, "train").items()}
        if self.exact:
            self._advance_exact(floats, version)
            return
        if self.reference is None:
            self.reference = self._first_reference(floats, version)
            self.version = version
            return
        if version == self.version:
            return
        if not self.sends.free:  # a queued WORK still reads the reference: leave it that memory
            self.reference = {k: t.clone() for k, t in self.reference.items()}
            self.sends = BufferSet({}, busy=False)
        with self._changing(version):
            keep = wire or not self.reference_is_shared
            fused = self._cast_delta(floats, keep) if self.cast else None
            if fused is not None:
                parts_sent, encodings = fused
            else:
                keep = True
                diff = {k: floats[k] - self.reference[k] for k in floats}
                parts, encodings = self.compressor.compress(diff)
                parts_sent = {k: WireTensor.from_tensor(v) for k, v in parts.items()}
                decoded = expand(
                    Message(MsgType.WORK, tensors=dict(parts_sent), encodings=encodings),
                    self.chain.codecs,
                    self.template,
                )
                for name, t in self.reference.items():
                    decoded[name].add_to(t)  # widened on the way when the chain is a cast
        self._delta = (parts_sent, encodings, self.version) if keep else None
        self.version = version

    def _advance_exact(self, floats: dict[str, torch.Tensor], version: int) -> None:
        """The shared copy of the model, made on first use and refreshed in one pass."""
        if self.reference is None:
            reference = self._first_reference(floats, version) if self.share else {}
            self.share = self.shared is not None  # no room (or too small): not tried again
            self.reference = reference if self.shared is not None else None
        elif version != self.version and self.reference_is_shared:
            with self._changing(version):
                for name, tensor in self.reference.items():
                    tensor.copy_(floats[name])
        self.version = version

    def _first_reference(
        self, floats: dict[str, torch.Tensor], version: int
    ) -> dict[str, torch.Tensor]:
        """A copy of the model: in a shared segment when workers on this host may read it."""
        if (
            self.share
            and sum(t.numel() * t.element_size() for t in floats.values()) >= SHM_MIN_BYTES
        ):
            try:
                self.shared = SharedTensors(floats)
            except OSError as exc:
                log.warning(
                    "the model reference stays private, workers on this host get deltas: cannot "
                    "make a shared segment (%s)",
                    exc.strerror,
                )
            else:
                with self.shared.changing(version):
                    for name, tensor in self.shared.tensors.items():
                        tensor.copy_(floats[name])
                log.info(
                    "model reference shared with workers on this host segment=%s", self.shared.name
                )
                return dict(self.shared.tensors)
        return {k: t.clone() for k, t in floats.items()}

    @contextlib.contextmanager
    def _changing(self, version: int) -> Iterator[None]:
        """Around a change of the reference: readers of the shared one see it (seqlock)."""
        if self.reference_is_shared:
            assert self.shared is not None
            with self.shared.changing(version):
                yield
        else:
            yield

    def _cast_delta(
        self, floats: dict[str, torch.Tensor], keep: bool = True
    ) -> tuple[dict[str, WireTensor], dict[str, list[dict[str, Any]]]] | None:
        """The delta through a one-cast chain, a block at a time: the difference, its
        cast and the reference's step by the cast value stay in cache. One pass over
        the model and the reference, where the chain's way takes seven (25M fp16,
        one process: 42-47 -> 14-24 ms). The worker widens and adds the same values, so both
        references stay bit-identical. None (take the chain's way) for a tensor the
        cast does not take. Without ``keep`` (no one will be sent this delta) only the
        reference steps: each block is cast into the same scratch, which stays in cache."""
        stage = self.chain.cast
        assert self.reference is not None and stage is not None
        if not all(t.numel() and stage.accepts(t) for t in self.reference.values()):
            return None
        wire, encodings = {}, {}
        for name, ref in self.reference.items():
            new, flat = floats[name].reshape(-1), ref.view(-1)
            scratch = torch.empty(min(WIDEN_BLOCK, flat.numel()), dtype=ref.dtype)
            narrow = torch.empty(0 if keep else scratch.numel(), dtype=type(stage).cast_from)
            chunks = []
            for start in range(0, flat.numel(), WIDEN_BLOCK):
                stop = min(start + WIDEN_BLOCK, flat.numel())
                diff = torch.sub(new[start:stop], flat[start:stop], out=scratch[: stop - start])
                cast = (
                    torch.empty(stop - start, dtype=narrow.dtype)
                    if keep
                    else narrow[: stop - start]
                )
                stage.encode_into(diff, cast)
                flat[start:stop].add_(
                    diff.copy_(cast)
                )  # what the worker adds: the cast value, widened
                chunks.append(cast)
            wire[f"{name}{SEP}x"] = WireTensor(chunks[0].dtype, (flat.numel(),), chunks)
            encodings[name] = self.chain.cast_record(ref)
        return wire, encodings

    def work(
        self, worker: str, state: dict[str, torch.Tensor], local: bool = False
    ) -> tuple[dict[str, WireTensor], dict[str, list[dict[str, Any]]], dict[str, Any]]:
        """(tensors, encodings, extra meta) of the WORK for ``worker``; ``state`` is the
        model's state dict (tensors that are not floating point always go whole).
        ``local``: the worker shares this host's memory (it may read the reference there)."""
        assert self.reference is not None
        tensors = {
            k: WireTensor.from_tensor(v) for k, v in state.items() if k not in self.reference
        }
        held = self.held.get(worker)
        self.held[worker] = self.version
        if self._reads_shared(worker, local):
            assert self.shared is not None
            return tensors, {}, {"downlink": True, "shared": self.shared.describe()}
        if held == self.version:  # e.g. a round run again: nothing new to send
            return tensors, {}, {"downlink": True, "delta_from": self.version}
        if self._delta is not None and held == self._delta[2]:
            wire, encodings, base = self._delta
            return tensors | wire, encodings, {"downlink": True, "delta_from": base}
        # The shared reference changes in place each round: what goes on a socket
        # (zero-copy, read while queued) is a copy of it.
        whole = (
            {k: v.clone() for k, v in self.reference.items()}
            if self.reference_is_shared
            else self.reference
        )
        tensors.update({k: WireTensor.from_tensor(v) for k, v in whole.items()})
        return tensors, {}, {"downlink": True}

    def serves(self, worker: str, local: bool) -> bool:
        """Whether ``worker``'s WORK comes from here (``work``); else it gets the model."""
        return not self.exact or self._reads_shared(worker, local)

    def _reads_shared(self, worker: str, local: bool) -> bool:
        return local and worker not in self.wire_only and self.reference_is_shared

    @property
    def reference_is_shared(self) -> bool:
        return (
            self.shared is not None
            and self.reference is not None
            and all(
                self.reference[k].data_ptr() == t.data_ptr() for k, t in self.shared.tensors.items()
            )
        )

    def forget(self, worker: str, unreadable: bool = False) -> None:
        """The worker does not hold what we thought (it said so, or left): send it all
        next time. ``unreadable``: it cannot read the shared reference (deltas for it)."""
        self.held.pop(worker, None)
        if unreadable:
            self.wire_only.add(worker)

    def left(self, worker: str) -> None:
        """The worker left: whoever joins under its name starts afresh."""
        self.held.pop(worker, None)
        self.wire_only.discard(worker)

    def close(self) -> None:
        """Unlink the shared segment (the job's engine is going)."""
        if self.shared is not None:
            self.shared.close()
