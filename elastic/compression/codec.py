"""The codec a compression stage implements (``Codec``).

Plugins subclass it (``elastic.api`` re-exports it); ``elastic.compression.chain``
runs chains of them. It knows tensors and nothing else, so the wire, the engines
and the worker can all use it without importing one another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

__all__ = ["Codec"]


class Codec(ABC):
    """A compression stage for update tensors, chosen by name in a job's codec chain
    (``[compression] update = ["topk:0.01", "fp16", "zstd"]``).

    Stages chain part by part: a tensor enters the first stage, each stage turns
    every part it ``accepts`` into named parts, and the next stage sees those (a
    part it does not accept passes through). The header records, per tensor, each
    stage applied with its argument and the shape and dtype it was given, so the
    coordinator decodes any chain with fresh instances and no other state.

    On a worker each tensor of each job gets its own instance, kept from round to
    round: state such as an error-feedback residual or warm-started factors lives on
    ``self``. ``decode`` must use no instance state. A codec computes on the tensor's
    device (CPU or CUDA) and must not move it, except a byte-level stage that has to
    work on host memory. Non-contiguous, empty and 0-d inputs must work.

    Class attributes:
        name: the name a chain uses to pick this codec (``"topk"`` in ``"topk:0.01"``).
        lossless: True when ``decode(encode(x))`` is ``x`` exactly.
        keeps_finite: True when ``decode`` of finite parts into float32 or float64
            can only give finite values (a cast to a wider type, finite values
            scattered into zeros). The coordinator already refuses parts with NaN
            or Inf; for a chain of such stages it skips checking the decoded tensor
            again. Leave it False when a product or a byte stage could overflow.
        cast_from: set (to a floating dtype) when ``decode`` is exactly its one part
            ``"x"``, of that dtype, cast to the tensor's wider dtype, and ``encode``
            works element by element (each element of ``"x"`` depends on that
            element of the input alone). Alone in a chain, such a stage is then not
            decoded at all: the part is folded as it came, widened element by element
            on the way (no decoded copy); and ``encode`` may be called on blocks of
            a tensor, written straight where they are sent from.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool] = False
    keeps_finite: ClassVar[bool] = False
    cast_from: ClassVar[torch.dtype | None] = None

    def __init__(self, arg: str | None = None) -> None:
        """Parse the stage argument (``"topk:0.01"`` gives ``arg="0.01"``); raise
        ``JobSpecError`` naming the stage and the fix when it is not valid."""
        self.arg = arg

    def accepts(self, tensor: torch.Tensor) -> bool:
        """Whether this stage encodes ``tensor`` (default: floating-point tensors)."""
        return tensor.dtype.is_floating_point

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode one tensor into named parts (each sent as a tensor of its own)."""

    @abstractmethod
    def decode(
        self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """Rebuild a tensor of ``shape`` and ``dtype`` from ``encode``'s parts.

        Parts come from the network: check what you rely on (names, sizes) and
        raise ``ValueError`` saying what is wrong; it becomes a NACK.
        """

    def encode_into(self, tensor: torch.Tensor, out: torch.Tensor) -> None:
        """For a ``cast_from`` codec: write ``encode(tensor)["x"]`` into ``out`` (flat,
        of ``cast_from``'s dtype, as many elements as ``tensor``), on blocks of a
        tensor as ``encode`` is. Override it to cast straight into ``out`` with no
        part in between; the default encodes and copies. ``ValueError`` when the
        codec gives parts other than ``x``."""
        parts = self.encode(tensor)
        if set(parts) != {"x"}:
            raise ValueError(
                f"codec {self.name} declares cast_from but returned parts {sorted(parts)}, not x"
            )
        out.copy_(parts["x"].reshape(-1))

    def error_bound(self, tensor: torch.Tensor) -> float:
        """An upper bound on ``max |decode(encode(x)) - x|`` for one call on a fresh
        instance (no error feedback carried in), stated per codec and checked by the
        conformance tests. Default: 0 for lossless codecs, else ``max |x|``."""
        if self.lossless or tensor.numel() == 0:
            return 0.0
        return float(tensor.detach().abs().max())
