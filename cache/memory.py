"""Memory for services that move multi-megabyte KV blocks: the process allocator's settings,
and large buffers (KV pools, staging buffers) backed up front without a start-up cost.

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
import mmap
import threading

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


# Linux madvise(2) advice values (Python's mmap module lacks the second).
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable, contents unchanged
PREFAULT_CHUNK = 32 << 20


def _madvise(addr: int, length: int, advice: int) -> bool:
    """madvise through ctypes, which releases the GIL for the call (mmap.madvise does not)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length),
                                ctypes.c_int(advice))) == 0
    except (OSError, AttributeError):
        return False


class AnonymousBuffer:
    """A large buffer of anonymous memory: zero pages from the kernel, each backed only when
    first written (so allocating it costs no start-up time; zeroing 1.5 GB of KV pool took
    2 s of a worker's start), in huge pages where the kernel gives them on request (512x
    fewer faults and TLB entries for memory read whole by attention and transfers).
    `prefault` backs it ahead of use (benchmarks do, so that no first write is timed).
    Serving workers do not: backing a local cluster's 2.5 GB of pools in the background took
    the cores and memory bandwidth from its first requests (the demo: 34-40 tokens/s against
    56 without it, also at nice 19); their pools hand out the most recently freed pages
    first instead (engine/kv_pool.py), so pages are faulted in once and stay warm."""

    def __init__(self, nbytes: int) -> None:
        self.mmap = mmap.mmap(-1, max(1, nbytes))
        self.nbytes = len(self.mmap)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mmap))
        _madvise(self.addr, self.nbytes, MADV_HUGEPAGE)

    def prefault(self, stop: threading.Event | None = None) -> int:
        """Backs the whole buffer now, in chunks, contents unchanged (safe while parts of it
        are in use). Returns the bytes populated (fewer where the kernel cannot, or when
        `stop` is set: the rest then faults in on first use, as before)."""
        done = 0
        while done < self.nbytes and not (stop is not None and stop.is_set()):
            n = min(PREFAULT_CHUNK, self.nbytes - done)
            if not _madvise(self.addr + done, n, MADV_POPULATE_WRITE):
                log.debug("prefault unavailable", extra={"errno": ctypes.get_errno()})
                return done
            done += n
        return done
