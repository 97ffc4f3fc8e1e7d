"""The built-in compression codecs.

Lossy stages compute on the tensor's device; ``zstd`` is the lossless last stage
and works on host bytes. Three stages keep an error-feedback residual on the worker
(what was not sent is added to the next round's input, so nothing is lost for
good): ``topk``, ``signsgd`` and ``powersgd``. Error bounds, per call on a fresh
instance, are stated by each ``error_bound`` and checked by the conformance tests.

=============  ==================================================  =====================
stage          parts sent                                           bound on max error
=============  ==================================================  =====================
fp16, bf16     the cast tensor (fp16 clamped to ±65504)            |x|·2^-11 (fp16), ·2^-8
topk:RATIO     int32/int64 indices + values of the largest |x|     the largest |x| dropped
qsgd:BITS      int8/int16 levels + one float32 norm per 512        bucket norm / (2^BITS−1)
signsgd        1 bit per element (packed) + one float32 scale      max|x| + mean|x|
powersgd:RANK  P (n×r) and Q (m×r), x ≈ P Qᵀ, matrices only        largest column norm
zstd[:LEVEL]   the compressed bytes                                 0 (lossless)
=============  ==================================================  =====================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from elastic.api import Codec, JobSpecError, hookimpl

__all__ = ["Fp16", "Bf16", "TopK", "QSGD", "SignSGD", "PowerSGD", "Zstd"]

FP16_MAX = 65504.0
QSGD_BUCKET = 512
CLAMP_BLOCK = 1 << 20  # elements clamped at a time by a cast: 4 MiB of float32, in cache


def _number(stage: str, arg: str | None, kind: type, default: Any, check: Any, hint: str) -> Any:
    if arg is None:
        if default is None:
            raise JobSpecError(f"codec {stage} needs an argument: {hint}")
        return default
    try:
        value = kind(arg)
    except ValueError:
        raise JobSpecError(
            f"codec {stage}:{arg}: {arg!r} is not a {kind.__name__}; {hint}"
        ) from None
    if not check(value):
        raise JobSpecError(f"codec {stage}:{arg} is out of range; {hint}")
    return value


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(what)


def _residual(state: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The error-feedback residual for ``like`` (zeros when new or reshaped)."""
    if state is None or state.shape != like.shape or state.device != like.device:
        return torch.zeros_like(like)
    return state


class _Cast(Codec):
    target: torch.dtype
    limit = math.inf
    keeps_finite = True  # a finite half value is a finite float
    relative = 0.0

    def __init__(self, arg: str | None = None) -> None:
        if arg is not None:
            raise JobSpecError(f"codec {self.name} takes no argument, got {self.name}:{arg}")
        super().__init__(arg)
        self._scratch: torch.Tensor | None = None  # encode_into's clamped block

    def accepts(self, tensor: torch.Tensor) -> bool:
        return tensor.dtype.is_floating_point and tensor.dtype != self.target

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        out = torch.empty(tensor.shape, dtype=self.target, device=tensor.device)
        self.encode_into(tensor, out.view(-1))
        return {"x": out}

    def encode_into(self, tensor: torch.Tensor, out: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1)
        if flat.device.type != "cpu" or not math.isfinite(self.limit):
            out.copy_(flat)
            if math.isfinite(self.limit):
                # Clamped after the cast, in the small dtype: what overflowed became
                # ±inf and is brought back to ±limit; NaN stays NaN (the receiver refuses it).
                out.clamp_(-self.limit, self.limit)
            return
        # On a CPU, half precision's clamp is unvectorised (25M elements: 3 of the
        # cast's 6.6 ms): clamp in the wide dtype instead, a cache-sized block at a
        # time into scratch, and cast that into ``out``. The values are the same:
        # what lies past ±limit would round to ±limit or overflow to ±inf, which
        # the clamp after the cast brings back to ±limit; NaN stays NaN.
        scratch = self._scratch
        if (
            scratch is None
            or scratch.dtype != flat.dtype
            or scratch.numel() < min(CLAMP_BLOCK, flat.numel())
        ):
            # Kept for the next call (the worker and the downlink call this a block at
            # a time): a fresh block would land on cold cache lines (25M: 7.5 -> 12 ms).
            scratch = self._scratch = torch.empty(min(CLAMP_BLOCK, flat.numel()), dtype=flat.dtype)
        for start in range(0, flat.numel(), CLAMP_BLOCK):
            block = flat[start : start + CLAMP_BLOCK]
            out[start : start + block.numel()].copy_(
                torch.clamp(block, -self.limit, self.limit, out=scratch[: block.numel()])
            )

    def decode(
        self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        x = parts["x"]
        _check(x.numel() == math.prod(shape), f"{x.numel()} elements for shape {list(shape)}")
        _check(
            x.dtype == self.target, f"the part is {x.dtype}, not {self.target}"
        )  # keeps_finite relies on it
        return x.to(dtype).reshape(shape)

    def error_bound(self, tensor: torch.Tensor) -> float:
        if tensor.numel() == 0:
            return 0.0
        biggest = float(tensor.detach().abs().max())
        overflow = max(0.0, biggest - self.limit)
        return overflow + min(biggest, self.limit) * self.relative + 1e-7


class Fp16(_Cast):
    """IEEE half precision (values beyond ±65504 are clamped, never made infinite)."""

    name = "fp16"
    target = cast_from = torch.float16
    limit = FP16_MAX
    relative = 2.0**-11


class Bf16(_Cast):
    """bfloat16: float32's range, 8 bits of mantissa."""

    name = "bf16"
    target = cast_from = torch.bfloat16
    relative = 2.0**-8


class TopK(Codec):
    """The ``RATIO`` share of elements largest in magnitude, with error feedback."""

    name = "topk"

    def __init__(self, arg: str | None = None) -> None:
        self.ratio = _number(
            "topk",
            arg,
            float,
            None,
            lambda v: 0 < v <= 1,
            "give the share kept in (0, 1], e.g. topk:0.01",
        )
        super().__init__(arg)
        self.residual: torch.Tensor | None = None

    def _k(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.ratio * n))) if n else 0

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = tensor.detach().reshape(-1)
        flat = flat.to(
            torch.promote_types(flat.dtype, torch.float32)
        )  # the residual keeps precision
        acc = flat + _residual(self.residual, flat)
        index = acc.abs().topk(self._k(acc.numel()), sorted=False).indices
        values = acc[index]
        acc[index] = 0  # what was not sent waits for the next round
        self.residual = acc
        wide = acc.numel() >= 2**31
        return {
            "indices": index.to(torch.int64 if wide else torch.int32),
            "values": values.to(tensor.dtype),
        }

    def decode(
        self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        index, values = parts["indices"].long(), parts["values"]
        n = math.prod(shape)
        _check(
            index.numel() == values.numel() <= n,
            f"{index.numel()} indices for {values.numel()} values of {n} elements",
        )
        _check(
            index.numel() == 0 or (0 <= int(index.min()) and int(index.max()) < n),
            "an index is out of range",
        )
        out = torch.zeros(n, dtype=dtype, device=values.device)
        out[index] = values.to(dtype)
        return out.reshape(shape)

    def error_bound(self, tensor: torch.Tensor) -> float:
        n = tensor.numel()
        k = self._k(n)
        if k >= n:
            return 0.0
        return float(tensor.detach().abs().reshape(-1).topk(k + 1).values[-1])


class QSGD(Codec):
    """Stochastic, unbiased quantisation to ``2^BITS - 1`` levels per sign (Alistarh
    et al. 2017), with one L2 norm per bucket of 512 elements."""

    name = "qsgd"

    def __init__(self, arg: str | None = None) -> None:
        self.bits = _number(
            "qsgd",
            arg,
            int,
            None,
            lambda v: 1 <= v <= 15,
            "give the bits per level in 1..15, e.g. qsgd:4",
        )
        self.levels = 2**self.bits - 1
        super().__init__(arg)

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = tensor.detach().reshape(-1).float()
        n = flat.numel()
        buckets = torch.nn.functional.pad(flat, (0, -n % QSGD_BUCKET)).view(-1, QSGD_BUCKET)
        norms = buckets.norm(dim=1)
        scaled = (
            buckets.abs()
            / norms.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
            * self.levels
        )
        lower = scaled.floor()
        level = lower + (torch.rand_like(scaled) < scaled - lower)  # stochastic rounding: unbiased
        signed = (level * buckets.sign()).reshape(-1)[:n]
        return {"levels": signed.to(torch.int8 if self.bits <= 7 else torch.int16), "norms": norms}

    def decode(
        self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        levels, norms = parts["levels"], parts["norms"].float()
        n = math.prod(shape)
        _check(
            levels.numel() == n and norms.numel() == -(-n // QSGD_BUCKET),
            f"{levels.numel()} levels and {norms.numel()} norms for {n} elements",
        )
        _check(
            levels.numel() == 0 or int(levels.abs().max()) <= self.levels,
            f"a level beyond {self.levels}",
        )
        padded = torch.nn.functional.pad(levels.float(), (0, -n % QSGD_BUCKET)).view(
            -1, QSGD_BUCKET
        )
        return (
            (padded * (norms / self.levels).unsqueeze(1)).reshape(-1)[:n].to(dtype).reshape(shape)
        )

    def error_bound(self, tensor: torch.Tensor) -> float:
        if tensor.numel() == 0:
            return 0.0
        flat = tensor.detach().reshape(-1).float()
        buckets = torch.nn.functional.pad(flat, (0, -flat.numel() % QSGD_BUCKET)).view(
            -1, QSGD_BUCKET
        )
        return float(buckets.norm(dim=1).max()) / self.levels * (1 + 1e-5) + 1e-7


class SignSGD(Codec):
    """One bit per element, scaled by the mean magnitude (EF-SignSGD, Karimireddy et
    al. 2019): the residual keeps what the signs did not carry."""

    name = "signsgd"

    def __init__(self, arg: str | None = None) -> None:
        if arg is not None:
            raise JobSpecError(f"codec signsgd takes no argument, got signsgd:{arg}")
        super().__init__(arg)
        self.residual: torch.Tensor | None = None

    @staticmethod
    def _shifts(device: torch.device) -> torch.Tensor:
        return torch.arange(7, -1, -1, dtype=torch.uint8, device=device)

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = tensor.detach().reshape(-1).float()
        acc = flat + _residual(self.residual, flat)
        scale = acc.abs().mean() if acc.numel() else acc.new_zeros(())
        positive = acc >= 0
        self.residual = acc - torch.where(positive, scale, -scale)
        bits = torch.nn.functional.pad(positive.to(torch.uint8), (0, -acc.numel() % 8)).view(-1, 8)
        packed = (bits << self._shifts(acc.device)).sum(dim=1, dtype=torch.uint8)
        return {"signs": packed, "scale": scale.reshape(1)}

    def decode(
        self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        packed, scale = parts["signs"], parts["scale"].float()
        n = math.prod(shape)
        _check(
            packed.dtype == torch.uint8 and packed.numel() == -(-n // 8) and scale.numel() == 1,
            f"{packed.numel()} sign bytes and {scale.numel()} scales for {n} elements",
        )
        bits = (packed.unsqueeze(1) >> self._shifts(packed.device)) & 1
        s = scale.reshape(())
        return torch.where(bits.reshape(-1)[:n].bool(), s, -s).to(dtype).reshape(shape)

    def error_bound(self, tensor: torch.Tensor) -> float:
        if tensor.numel() == 0:
            return 0.0
        magnitude = tensor.detach().abs().float()
        return float(magnitude.max() + magnitude.mean()) * (1 + 1e-6)


class PowerSGD(Codec):
    """Rank-``RANK`` approximation by one power iteration (Vogels et al. 2019), with
    error feedback and ``Q`` warm-started from the last round. Applies to tensors of
    2 or more dimensions (viewed as ``shape[0]`` × the rest) whose smaller side is
    larger than the rank; the others pass to the next stage unchanged."""

    name = "powersgd"

    def __init__(self, arg: str | None = None) -> None:
        self.rank = _number(
            "powersgd", arg, int, None, lambda v: v >= 1, "give the rank >= 1, e.g. powersgd:4"
        )
        super().__init__(arg)
        self.residual: torch.Tensor | None = None
        self.q: torch.Tensor | None = None

    def accepts(self, tensor: torch.Tensor) -> bool:
        if not tensor.dtype.is_floating_point or tensor.dim() < 2 or tensor.numel() == 0:
            return False
        rows = tensor.shape[0]
        return self.rank < min(rows, tensor.numel() // rows)

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = tensor.shape[0]
        matrix = tensor.detach().reshape(rows, -1).float()
        acc = matrix + _residual(self.residual, matrix)
        q = self.q
        if q is None or q.shape != (acc.shape[1], self.rank) or q.device != acc.device:
            generator = torch.Generator(device=acc.device).manual_seed(0)
            q = torch.randn(acc.shape[1], self.rank, generator=generator, device=acc.device)
        p = torch.linalg.qr(acc @ q).Q  # orthonormal columns
        q = acc.T @ p
        self.residual = acc - p @ q.T
        self.q = q
        return {"p": p.contiguous(), "q": q.contiguous()}

    def decode(
        self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        p, q = parts["p"].float(), parts["q"].float()
        _check(len(shape) >= 2, f"shape {list(shape)} is not a matrix")
        rows, cols = shape[0], math.prod(shape[1:])
        _check(
            p.dim() == q.dim() == 2
            and p.shape[0] == rows
            and q.shape[0] == cols
            and p.shape[1] == q.shape[1],
            f"factors {list(p.shape)} and {list(q.shape)} do not make a {rows}x{cols} matrix",
        )
        return (p @ q.T).to(dtype).reshape(shape)

    def error_bound(self, tensor: torch.Tensor) -> float:
        matrix = tensor.detach().reshape(tensor.shape[0], -1).float()
        return float(matrix.norm(dim=0).max()) * (1 + 1e-4) + 1e-6


class Zstd(Codec):
    """Lossless zstandard compression of the raw bytes; works on host memory (a
    tensor on a GPU is copied to the host first: this is the stage that feeds the
    wire). ``zstd:LEVEL`` picks the level (1..22, default 3)."""

    name = "zstd"
    lossless = True

    def __init__(self, arg: str | None = None) -> None:
        self.level = _number(
            "zstd", arg, int, 3, lambda v: 1 <= v <= 22, "give a level in 1..22, e.g. zstd:3"
        )
        super().__init__(arg)

    def accepts(self, tensor: torch.Tensor) -> bool:
        return True

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        import zstandard  # noqa: PLC0415 - only jobs that compress pay for it

        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        packed = zstandard.ZstdCompressor(level=self.level).compress(raw.tobytes())
        return {"z": torch.frombuffer(bytearray(packed), dtype=torch.uint8)}

    def decode(
        self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        import zstandard  # noqa: PLC0415

        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        packed = parts["z"].cpu().numpy().tobytes()
        try:
            # A frame may declare its size, and the decompressor would allocate that
            # much: check it against the tensor's before anything is allocated.
            declared = zstandard.frame_content_size(packed)
            if declared not in (-1, size):
                raise ValueError(
                    f"the zstd frame declares {declared} bytes, the tensor needs {size}"
                )
            raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=size)
        except (zstandard.ZstdError, MemoryError) as exc:
            raise ValueError(
                f"not a zstd frame of {size} bytes ({type(exc).__name__}: {exc})"
            ) from None
        _check(len(raw) == size, f"{len(raw)} bytes decompressed, the tensor needs {size}")
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


@hookimpl
def elastic_codecs() -> list[type]:
    return [Fp16, Bf16, TopK, QSGD, SignSGD, PowerSGD, Zstd]
