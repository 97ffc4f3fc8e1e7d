"""Keep the C heap warm: for ZeroMQ's receive buffers, and for model-sized tensors.

libzmq mallocs a buffer per received frame. With glibc's defaults a model's worth
of freed 1 MiB frames goes back to the OS after every message and is faulted in
again on the next one: on loopback that alone cut 1 MiB-frame throughput from
~5.5 GB/s to ~1.6 GB/s (benchmarks/transport.py).

The same holds for tensors: glibc serves any block over its mmap threshold (at most
32 MiB) with a fresh mapping, so every model-sized temporary (a delta, a cast, a
decoded update) is faulted in page by page, zeroed, and unmapped when freed. A cast
of 25M floats to fp16 took 19 ms that way and 4 ms from the warm heap; the fp16
downlink's step 113 ms and 24 ms. So the daemons turn chunk mappings off: every
block comes from the heap, and freed memory (up to ``TRIM_THRESHOLD`` at its top)
is kept for the next one. The price is that the heap gives back little once grown:
a daemon's RSS stays at its high-water mark, which is what it needs each round.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["tune_allocator"]

log = logging.getLogger("elastic.allocator")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# Blocks below this come from the heap (frames are 1 MiB). Still set beside
# M_MMAP_MAX = 0: without it the shared-memory round trip measured 102 ms, not 81.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 << 30  # free memory kept at the heap top before giving it back

_done = False


def tune_allocator() -> bool:
    """Apply the settings once per process; False where the C library is not glibc."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(
        mallopt(option, value)
        for option, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_MMAP_MAX, 0),
        )
    )
    _done = ok
    log.debug("allocator tuned=%s", ok)
    return ok
