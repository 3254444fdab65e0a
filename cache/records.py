"""The block store's records: what RocksDB holds per block, and the store's counters."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from pdserve.cache.errors import StoreFull

__all__ = ["ACCESS", "LOC", "LOC_MAGIC", "Meta", "StoreFull", "StoreStats", "now_ms"]

ACCESS = struct.Struct("<QIII")  # `access` column family: atime ms, hits, size, depth
LOC = struct.Struct("<4sQQI")    # `blocks` column family: magic, segment, offset, length
LOC_MAGIC = b"PDLC"


@dataclass
class StoreStats:
    num_blocks: int = 0
    num_bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    corrupt: int = 0
    evicted: int = 0
    expired: int = 0
    write_errors: int = 0


@dataclass
class Meta:
    """One block's access record and location, as the store keeps them in memory."""

    atime: int   # last access, unix ms
    hits: int
    size: int
    depth: int   # block index in its hash chain (0 = first block)
    seg: int = -1  # segment file holding the bytes; -1: in the `blocks` column family (old stores)
    off: int = 0

    def pack(self) -> bytes:
        return ACCESS.pack(self.atime, self.hits, self.size, self.depth)

    @classmethod
    def unpack(cls, raw: bytes) -> Meta:
        return cls(*ACCESS.unpack(raw))

    def loc(self) -> bytes:
        return LOC.pack(LOC_MAGIC, self.seg, self.off, self.size)

    def where(self) -> tuple[int, int, int]:
        return self.seg, self.off, self.size


def now_ms() -> int:
    return int(time.time() * 1000)
