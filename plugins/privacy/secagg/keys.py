"""The cryptography of a SecAgg round, from ``cryptography``: X25519 key agreement
(through HKDF-SHA256), AES-GCM for the shares clients send each other through the
coordinator, and AES-256 in counter mode as the pseudo-random generator that
expands a 32-byte seed into a mask over a whole update, in Z_(2^32).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "KeyPair",
    "agree",
    "seal",
    "unseal",
    "add_masks",
    "keystream",
    "PRG",
    "commitment",
    "new_seed",
    "private_from_bytes",
]

SEED = 32
PRG = "aes256-ctr"  # named in the job's settings: a worker that expands otherwise refuses
CHUNK = 1 << 16  # mask elements expanded at a time: 256 KiB of keystream, in cache


class KeyPair:
    """An X25519 key pair; ``private`` may be shared (its bytes), ``public`` sent."""

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self.private = private or X25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def private_bytes(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )


def private_from_bytes(data: bytes) -> KeyPair:
    """The key pair of a private key given as its 32 bytes (a reconstructed one)."""
    return KeyPair(X25519PrivateKey.from_private_bytes(data))


def agree(pair: KeyPair, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both sides derive: X25519 then HKDF-SHA256 with ``info``."""
    shared = pair.private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(hashes.SHA256(), SEED, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-GCM with a random 96-bit nonce, sent in front."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """What ``seal`` sealed; ``cryptography``'s InvalidTag when it was altered."""
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)


def new_seed() -> bytes:
    return os.urandom(SEED)


def commitment(seed: bytes) -> bytes:
    """SHA-256 of a seed: sent before the seed is shared, so a reconstructed seed
    can be checked (and a bad share found)."""
    return hashlib.sha256(seed).digest()


def keystream(seed: bytes) -> CipherContext:
    """The PRG of a 32-byte seed: the keystream of AES-256 keyed by it, in counter
    mode (what it encrypts zeros to). Each seed keys one stream only (fresh each
    round, or agreed for one pair and round), so the fixed nonce never repeats
    under a key.

    The counter mode is GCM's (its tag is never computed): OpenSSL runs GCM's
    encryption with vector AES instructions where the CPU has them: 2.5 times
    plain AES-256-CTR's speed and 2.9 times ChaCha20's where we measured
    (``benchmarks/secagg_masking.py``, ``benchmarks/RESULTS.md``, issue 20)."""
    return Cipher(algorithms.AES256(seed), modes.GCM(bytes(12))).encryptor()


def add_masks(acc: np.ndarray, masks: Sequence[tuple[bytes, int]]) -> None:
    """``acc += sum(sign * PRG(seed))`` in Z_(2^32), in place (``acc`` uint32): each
    PRG is ``keystream(seed)``. A block of ``CHUNK``
    elements at a time, every mask added to it while it is in cache: one pass over
    ``acc`` whatever the number of masks."""
    streams = [(keystream(seed), sign) for seed, sign in masks]
    zeros = memoryview(bytes(4 * min(CHUNK, acc.size)))
    block = bytearray(len(zeros))
    flat = acc.reshape(-1)
    for start in range(0, flat.size, CHUNK):
        stop = min(start + CHUNK, flat.size)
        target = flat[start:stop]
        for encryptor, sign in streams:
            encryptor.update_into(zeros[: 4 * (stop - start)], block)
            stream = np.frombuffer(block, dtype=np.uint32, count=stop - start)
            (np.add if sign > 0 else np.subtract)(target, stream, out=target)
