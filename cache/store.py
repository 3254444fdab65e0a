"""Disk-backed KV block store on RocksDB (rocksdict, raw mode: values are never pickled).

Column families:
- `blocks`: key = block hash (32 bytes), value = encoded block (cache/codec.py)
- `access`: key = block hash, value = <last access unix-ms u64><hit count u32><size u32>

Every read verifies the block; a corrupt block is deleted, counted, and reported as a miss.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import rocksdict

from pdserve.cache.codec import verify_block
from pdserve.cache.errors import CorruptBlock

log = logging.getLogger(__name__)

_ACCESS = struct.Struct("<QII")
SYNC_POLICIES = ("every_write", "off")


@dataclass
class StoreStats:
    num_blocks: int = 0
    num_bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    corrupt: int = 0


def _now_ms() -> int:
    return int(time.time() * 1000)


class BlockStore:
    def __init__(self, path: str | Path, sync: str = "every_write") -> None:
        if sync not in SYNC_POLICIES:
            raise ValueError(f"sync must be one of {SYNC_POLICIES}, got {sync!r}")
        Path(path).mkdir(parents=True, exist_ok=True)
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        blob_opts = rocksdict.Options(raw_mode=True)
        blob_opts.set_enable_blob_files(True)  # large values go to blob files, not the LSM
        blob_opts.set_min_blob_size(4096)
        self._db = rocksdict.Rdict(
            str(path), options=opts,
            column_families={"blocks": blob_opts, "access": rocksdict.Options(raw_mode=True)},
        )
        self._blocks = self._db.get_column_family("blocks")
        self._access = self._db.get_column_family("access")
        self._blocks_h = self._db.get_column_family_handle("blocks")
        self._access_h = self._db.get_column_family_handle("access")
        self._wopt = rocksdict.WriteOptions()
        self._wopt.sync = sync == "every_write"
        self._lock = threading.Lock()
        self.stats = StoreStats()
        self._recount()

    def _recount(self) -> None:
        n = size = 0
        for _, v in self._access.items():
            n += 1
            size += _ACCESS.unpack(v)[2]
        self.stats.num_blocks, self.stats.num_bytes = n, size

    def close(self) -> None:
        # Column-family handles keep the database open; drop them before closing.
        for name in ("_blocks", "_access", "_blocks_h", "_access_h"):
            setattr(self, name, None)
        self._db.close()

    # -- reads ----------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are stored (metadata only; no block is read)."""
        if not keys:
            return 0
        metas = self._access.get(list(keys))
        n = 0
        for m in metas:
            if m is None:
                break
            n += 1
        return n

    def get_many(self, keys: Sequence[bytes]) -> list[bytes]:
        """Verified blocks for the leading keys; stops at the first missing or corrupt one."""
        out: list[bytes] = []
        for key in keys:
            value = self._blocks.get(key)
            if value is None:
                break
            try:
                verify_block(key, value)
            except CorruptBlock as e:
                log.warning("corrupt block deleted", extra={"key": key.hex()[:16], "why": str(e)})
                self._delete(key)
                with self._lock:
                    self.stats.corrupt += 1
                break
            out.append(value)
        with self._lock:
            self.stats.hits += len(out)
            self.stats.misses += len(keys) - len(out)
        self._touch(keys[: len(out)])
        return out

    def _touch(self, keys: Iterable[bytes]) -> None:
        keys = list(keys)
        if not keys:
            return
        wb = rocksdict.WriteBatch(raw_mode=True)
        now = _now_ms()
        for key, meta in zip(keys, self._access.get(keys)):
            if meta is None:
                continue
            _, hits, size = _ACCESS.unpack(meta)
            wb.put(key, _ACCESS.pack(now, hits + 1, size), self._access_h)
        self._db.write(wb)  # access times need no fsync

    # -- writes -----------------------------------------------------------------------
    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        """Stores verified blocks in one atomic batch; returns how many were new."""
        for key, value in items:
            verify_block(key, value)
        keys = [k for k, _ in items]
        existing = self._access.get(keys) if keys else []
        wb = rocksdict.WriteBatch(raw_mode=True)
        now = _now_ms()
        new = added = 0
        for (key, value), meta in zip(items, existing):
            if meta is not None:
                continue
            wb.put(key, value, self._blocks_h)
            wb.put(key, _ACCESS.pack(now, 0, len(value)), self._access_h)
            new += 1
            added += len(value)
        if new:
            self._db.write(wb, self._wopt)
        with self._lock:
            self.stats.puts += new
            self.stats.num_blocks += new
            self.stats.num_bytes += added
        return new

    def _delete(self, key: bytes) -> None:
        meta = self._access.get(key)
        wb = rocksdict.WriteBatch(raw_mode=True)
        wb.delete(key, self._blocks_h)
        wb.delete(key, self._access_h)
        self._db.write(wb, self._wopt)
        if meta is not None:
            with self._lock:
                self.stats.num_blocks -= 1
                self.stats.num_bytes -= _ACCESS.unpack(meta)[2]

    def raw_put(self, key: bytes, value: bytes) -> None:
        """Writes bytes as they are, unverified: for tests that corrupt blocks on purpose."""
        self._blocks[key] = value
