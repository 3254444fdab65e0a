"""Process allocator settings for services that move multi-megabyte KV blocks.

glibc serves an allocation above its mmap threshold (128 KiB at start) with a fresh mmap and
returns it with munmap: every 3 MB block read from RocksDB or received over gRPC then pays
about 700 page faults for memory it touches once. Raising the threshold (and the trim
threshold, so freed blocks are reused rather than handed back at once) keeps those buffers on
the heap: store reads went from about 1.1 to 3 GB/s on the benchmark machine
(bench/bench_store.py). Costs up to `trim_bytes` of freed memory kept by the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_large_buffers_on_heap(mmap_bytes: int = 64 << 20, trim_bytes: int = 256 << 20) -> bool:
    """Sets glibc's mmap and trim thresholds; False (and nothing changed) on another libc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                         trim_bytes))
    log.debug("malloc thresholds", extra={"mmap_bytes": mmap_bytes, "trim_bytes": trim_bytes,
                                          "ok": ok})
    return ok
