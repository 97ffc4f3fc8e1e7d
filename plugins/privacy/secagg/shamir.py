"""Shamir's t-of-n secret sharing of byte strings over GF(2^127 - 1).

A secret is cut into 15-byte pieces (each below the prime); every piece is the
constant term of its own random polynomial of degree t - 1, and a share is the
polynomials' values at the holder's x (1, 2, ...). Any t shares give the secret
back (Lagrange interpolation at 0); fewer say nothing about it. Randomness comes
from ``secrets``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations

__all__ = ["Share", "split", "combine", "recover", "PRIME"]

MAX_SUBSETS = 4096  # subsets ``recover`` tries before it gives up on finding the bad shares

PRIME = 2**127 - 1
PIECE = 15  # bytes per field element: 2^120 < PRIME
VALUE = 16  # bytes per field element on the wire


@dataclass(frozen=True)
class Share:
    """One holder's share: its x and the polynomials' values there."""

    x: int
    values: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(4, "big") + b"".join(v.to_bytes(VALUE, "big") for v in self.values)

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """A share from the wire; ``ValueError`` when it cannot be one."""
        if len(data) < 4 or (len(data) - 4) % VALUE:
            raise ValueError(f"a share is 4 + 16k bytes, got {len(data)}")
        x = int.from_bytes(data[:4], "big")
        values = tuple(
            int.from_bytes(data[i : i + VALUE], "big") for i in range(4, len(data), VALUE)
        )
        if x == 0 or any(v >= PRIME for v in values):
            raise ValueError("a share's x must be > 0 and its values below the prime")
        return cls(x, values)


def split(secret: bytes, holders: Sequence[int], threshold: int) -> list[Share]:
    """Shares of ``secret`` for the holders at x in ``holders`` (distinct, > 0);
    any ``threshold`` of them give it back."""
    if not 1 <= threshold <= len(holders) or len(set(holders)) != len(holders) or 0 in holders:
        raise ValueError(f"need 1 <= threshold {threshold} <= {len(holders)} distinct x > 0")
    pieces = [int.from_bytes(secret[i : i + PIECE], "big") for i in range(0, len(secret), PIECE)]
    polynomials = [
        [piece] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)] for piece in pieces
    ]
    return [Share(x, tuple(_evaluate(poly, x) for poly in polynomials)) for x in holders]


def combine(shares: Sequence[Share], threshold: int, length: int) -> bytes:
    """The secret of ``length`` bytes from the first ``threshold`` shares."""
    chosen = list(shares)[:threshold]
    if len(chosen) < threshold or len({s.x for s in chosen}) < threshold:
        raise ValueError(f"need {threshold} shares with distinct x, got {len(chosen)}")
    pieces = []
    for k in range(len(chosen[0].values)):
        value = 0
        for i, share in enumerate(chosen):
            numerator, denominator = 1, 1
            for j, other in enumerate(chosen):
                if i != j:
                    numerator = numerator * other.x % PRIME
                    denominator = denominator * (other.x - share.x) % PRIME
            value = (value + share.values[k] * numerator * pow(denominator, -1, PRIME)) % PRIME
        pieces.append(value)
    sizes = [PIECE] * (length // PIECE) + ([length % PIECE] if length % PIECE else [])
    if len(sizes) != len(pieces) or any(
        p >= 1 << (8 * n) for p, n in zip(pieces, sizes, strict=True)
    ):
        raise ValueError("the shares do not make a secret of that length")
    return b"".join(p.to_bytes(n, "big") for p, n in zip(pieces, sizes, strict=True))


def recover(
    shares: Sequence[Share], threshold: int, length: int, check: Callable[[bytes], bool]
) -> tuple[bytes, list[int]]:
    """The secret that ``check`` accepts, and the x of the shares that do not lie
    on its polynomial (bad shares, whoever made them). ``ValueError`` when no
    ``threshold`` of the shares give an accepted secret."""
    shares = list(shares)
    for tried, subset in enumerate(combinations(shares, threshold)):
        if tried >= MAX_SUBSETS:
            break
        try:
            secret = combine(subset, threshold, length)
        except ValueError:
            continue
        if not check(secret):
            continue
        bad = [
            s.x
            for s in shares
            if s not in subset and not _fits(s, subset, threshold, length, secret)
        ]
        return secret, bad
    raise ValueError(f"no {threshold} of the {len(shares)} shares give the secret")


def _fits(
    share: Share, subset: Sequence[Share], threshold: int, length: int, secret: bytes
) -> bool:
    """Whether ``share`` lies on the polynomials ``subset`` defines."""
    try:
        return combine([share, *subset[: threshold - 1]], threshold, length) == secret
    except ValueError:
        return False


def _evaluate(polynomial: list[int], x: int) -> int:
    value = 0
    for coefficient in reversed(polynomial):
        value = (value * x + coefficient) % PRIME
    return value
