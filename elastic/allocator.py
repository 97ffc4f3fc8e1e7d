"""Keep the C heap warm for ZeroMQ's receive buffers.

libzmq mallocs a buffer per received frame. With glibc's defaults a model's worth
of freed 1 MiB frames goes back to the OS after every message and is faulted in
again on the next one: on loopback that alone cut 1 MiB-frame throughput from
~5.5 GB/s to ~1.6 GB/s (benchmarks/transport.py). The daemons therefore ask glibc
to serve frame-sized blocks from the heap and to keep freed memory for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["tune_allocator"]

log = logging.getLogger("elastic.allocator")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap (frames are 1 MiB)
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
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _done = ok
    log.debug("allocator tuned=%s", ok)
    return ok
