"""The block store's catalog: what blocks it holds and where, in RocksDB (rocksdict, raw mode:
values are never pickled) and in memory, with the store's counters.

Column families:
- `blocks`: key = block hash (32 bytes), value = where the encoded block (cache/codec.py) is:
  b"PDLC" <segment u64><offset u64><length u32>. Stores written before the segment files hold
  the encoded block itself here (blob files on); those blocks stay readable (`old_value`), and
  a writable open moves them into segments (cache/store.py).
- `access`: key = block hash, value = <last access ms u64><hit count u32><size u32><depth u32>

Lookups are answered from the in-memory copy and never touch the disk. `record` and `remove`
change RocksDB first (one atomic batch, synced when the store's policy says so), then memory.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import rocksdict

from pdserve.cache.block_hash import BlockHash
from pdserve.cache.records import LOC, LOC_MAGIC, Meta, StoreStats, now_ms

log = logging.getLogger("pdserve.cache.store")

_STATS_KEY = b"pdserve:stats"  # lifetime counters, in the default column family
COUNTERS = ("hits", "misses", "puts", "corrupt", "evicted", "expired", "write_errors")
GONE_MEMORY = 1 << 20  # evicted-key prefixes remembered (about 100 MiB at most)

Where = tuple[int, int, int]  # (segment, offset, length); segment -1: an old store's blob value


def _key(k: object) -> BlockHash:
    """A key as rocksdict gives it in raw mode (bytes)."""
    assert isinstance(k, bytes), type(k)
    return BlockHash(k)


class Catalog:
    def __init__(self, path: Path, sync: bool, read_only: bool = False,
                 clock_ms: Callable[[], int] = now_ms) -> None:
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        blob_opts = rocksdict.Options(raw_mode=True)
        blob_opts.set_enable_blob_files(True)  # old stores' values live in blob files
        blob_opts.set_min_blob_size(4096)
        blob_opts.set_enable_blob_gc(True)
        kwargs: dict[str, Any] = {}
        if read_only:
            kwargs["access_type"] = rocksdict.AccessType.read_only()
        self._db = rocksdict.Rdict(
            str(path), options=opts,
            column_families={"blocks": blob_opts, "access": rocksdict.Options(raw_mode=True)},
            **kwargs)
        self._blocks: rocksdict.Rdict | None = self._db.get_column_family("blocks")
        # Every block carries its own xxh3 checksum, verified on every read (codec.py);
        # RocksDB's second checksum over old stores' blob records costs more than the read.
        reads = rocksdict.ReadOptions()
        reads.set_verify_checksums(False)
        self._blocks.set_read_options(reads)
        self._access: rocksdict.Rdict | None = self._db.get_column_family("access")
        # Handles of the column families, for write batches (dropped at close: they keep the
        # database open).
        self._handles: tuple[Any, Any] | None = (self._db.get_column_family_handle("blocks"),
                                                 self._db.get_column_family_handle("access"))
        self._synced = rocksdict.WriteOptions()
        self._synced.sync = sync
        self._lazy = rocksdict.WriteOptions()  # access times need no fsync
        self.read_only = read_only
        self.clock_ms = clock_ms
        self.lock = threading.Lock()  # guards the index and the counters
        self._meta: dict[BlockHash, Meta] = {}
        # Keys evicted or expired since start (8-byte prefixes, bounded): lets a Lookup tell a
        # miss on an evicted block from one on a block never stored, for the request ledger.
        self._gone: OrderedDict[bytes, None] = OrderedDict()
        self.stats = StoreStats()
        self.num_old_values = 0  # blocks whose bytes are still in the `blocks` column family
        self._load()

    def _load(self) -> None:
        saved = self._db.get(_STATS_KEY)
        if saved is not None:  # lifetime counters of earlier runs
            for name, value in json.loads(saved).items():
                if name in COUNTERS:
                    setattr(self.stats, name, int(value))
        assert self._access is not None and self._blocks is not None
        for k, v in self._access.items():
            m = Meta.unpack(v)
            self._meta[_key(k)] = m
            self.stats.num_bytes += m.size
        self.stats.num_blocks = len(self._meta)
        for k, v in self._blocks.items():
            entry = self._meta.get(_key(k))
            if entry is None:
                continue
            if len(v) == LOC.size and v[:4] == LOC_MAGIC:
                _, entry.seg, entry.off, _ = LOC.unpack(v)
            else:
                self.num_old_values += 1

    def _cf(self, name: str) -> Any:
        assert self._handles is not None, "the catalog is closed"
        return self._handles[0 if name == "blocks" else 1]

    # -- queries (memory) -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._meta)

    def lookup(self, keys: Sequence[BlockHash]) -> int:
        """How many leading keys are stored."""
        n = 0
        with self.lock:
            for k in keys:
                if k not in self._meta:
                    break
                n += 1
        return n

    def present(self, keys: Sequence[BlockHash]) -> list[bool]:
        with self.lock:
            return [k in self._meta for k in keys]

    def sizes(self, keys: Sequence[BlockHash]) -> list[int]:
        """Stored sizes of the leading stored keys' blocks (header included)."""
        out = []
        with self.lock:
            for k in keys:
                m = self._meta.get(k)
                if m is None:
                    break
                out.append(m.size)
        return out

    def where(self, key: BlockHash) -> Where | None:
        with self.lock:
            m = self._meta.get(key)
            return m.where() if m is not None else None

    def meta(self, key: BlockHash) -> Meta | None:
        with self.lock:
            return self._meta.get(key)

    def was_removed(self, keys: Sequence[BlockHash]) -> list[bool]:
        """Per key: absent now, and evicted or expired earlier in this process's life."""
        with self.lock:
            return [k not in self._meta and k[:8] in self._gone for k in keys]

    def live_segments(self) -> dict[int, tuple[int, int]]:
        """Per segment: (live blocks, end of its last live block)."""
        live: dict[int, tuple[int, int]] = {}
        with self.lock:
            for m in self._meta.values():
                if m.seg >= 0:
                    n, end = live.get(m.seg, (0, 0))
                    live[m.seg] = (n + 1, max(end, m.off + m.size))
        return live

    def items(self) -> list[tuple[BlockHash, Where]]:
        with self.lock:
            return [(k, m.where()) for k, m in self._meta.items()]

    def eviction_order(self) -> list[BlockHash]:
        """All keys, first to go first: least recently used; at equal time, deepest first."""
        with self.lock:
            items = list(self._meta.items())
        items.sort(key=lambda kv: (kv[1].atime, -kv[1].depth, kv[0]))
        return [k for k, _ in items]

    def accessed_before(self, cutoff_ms: int) -> list[BlockHash]:
        with self.lock:
            return [k for k, m in self._meta.items() if m.atime < cutoff_ms]

    # -- changes ----------------------------------------------------------------------------
    def new_entries(self, items: Sequence[tuple[BlockHash, int, int]],
                    replace: bool = False) -> dict[BlockHash, Meta]:
        """Entries for (key, size, depth) not stored yet (all of them with `replace`, keeping
        their access history); not recorded until `record`."""
        now = self.clock_ms()
        new: dict[BlockHash, Meta] = {}
        with self.lock:
            for key, size, depth in items:
                prev = self._meta.get(key)
                if key in new or (prev is not None and not replace):
                    continue
                new[key] = (Meta(now, 0, size, depth) if prev is None else
                            Meta(prev.atime, prev.hits, size, depth))
        return new

    def record(self, new: dict[BlockHash, Meta]) -> list[Where]:
        """Stores the entries' locations and access records in one atomic batch (synced per the
        policy), then in memory; returns the locations they replaced (bytes to free)."""
        wb = rocksdict.WriteBatch(raw_mode=True)
        for key, m in new.items():
            wb.put(key, m.loc(), self._cf("blocks"))
            wb.put(key, m.pack(), self._cf("access"))
        self._db.write(wb, self._synced)
        freed = []
        with self.lock:
            for key, m in new.items():
                prev = self._meta.get(key)
                if prev is None:
                    self.stats.num_blocks += 1
                else:
                    self.stats.num_bytes -= prev.size
                    if prev.seg >= 0:
                        freed.append(prev.where())
                self._meta[key] = m
                self.stats.num_bytes += m.size
        return freed

    def remove(self, keys: Sequence[BlockHash], gone: bool = False) -> list[Where]:
        """Deletes the keys (memory, then one batch); returns their segment ranges to free.
        `gone`: remembered as evicted or expired."""
        wb = rocksdict.WriteBatch(raw_mode=True)
        ranges = []
        with self.lock:
            for key in keys:
                m = self._meta.pop(key, None)
                wb.delete(key, self._cf("blocks"))
                wb.delete(key, self._cf("access"))
                if m is not None:
                    self.stats.num_blocks -= 1
                    self.stats.num_bytes -= m.size
                    if m.seg >= 0:
                        ranges.append(m.where())
            if gone:
                for k in keys:
                    self._gone[k[:8]] = None
                while len(self._gone) > GONE_MEMORY:
                    self._gone.popitem(last=False)
        self._db.write(wb, self._synced)
        return ranges

    def count_read(self, keys: Sequence[BlockHash], n: int) -> None:
        """The leading n keys were read: hits, the rest misses; the hits' access times (one
        time for the whole chain: parents never older than their tails)."""
        with self.lock:
            self.stats.hits += n
            self.stats.misses += len(keys) - n
        if not n or self.read_only:
            return
        now = self.clock_ms()
        wb = rocksdict.WriteBatch(raw_mode=True)
        with self.lock:
            for key in keys[:n]:
                m = self._meta.get(key)
                if m is None:
                    continue
                m.atime, m.hits = now, m.hits + 1
                wb.put(key, m.pack(), self._cf("access"))
        try:
            self._db.write(wb, self._lazy)
        except Exception as e:  # noqa: BLE001 - access times are best effort
            log.warning("access time update failed", extra={"why": str(e)})

    def count(self, counter: str, n: int = 1) -> None:
        with self.lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + n)

    # -- old layout, persistence -------------------------------------------------------------------
    def old_value(self, key: BlockHash) -> bytes | None:
        """An old store's block, still in the `blocks` column family."""
        assert self._blocks is not None
        return self._blocks.get(key)

    def old_values(self) -> Iterator[tuple[BlockHash, bytes]]:
        """Blocks still in the old layout, lazily (too many to hold at once)."""
        assert self._blocks is not None
        for k, v in self._blocks.items():
            key = _key(k)
            m = self._meta.get(key)
            if m is not None and m.seg < 0:
                yield key, bytes(v)

    def orphans(self) -> list[BlockHash]:
        """Locations without an access record (a damaged store)."""
        assert self._blocks is not None
        return [key for key in (_key(k) for k in self._blocks.keys())
                if key not in self._meta]

    def save_counters(self) -> None:
        with self.lock:
            counters = {n: getattr(self.stats, n) for n in COUNTERS}
        self._db.put(_STATS_KEY, json.dumps(counters).encode(), self._lazy)

    def flush_wal(self) -> None:
        self._db.flush_wal(True)

    def raw_write(self, key: BlockHash, blocks_value: bytes, access_value: bytes) -> None:
        """Writes both column families' values as they are (tests of damaged stores)."""
        assert self._blocks is not None and self._access is not None
        self._blocks[key] = blocks_value
        self._access[key] = access_value

    def raw_location(self, key: BlockHash) -> bytes | None:
        assert self._blocks is not None
        return self._blocks.get(key)

    def close(self, flush: bool) -> None:
        if flush:
            try:
                self._db.flush_wal(True)
            except Exception:  # noqa: BLE001 - read-only stores have nothing to flush
                pass
        # Column-family handles keep the database open; drop them before closing.
        self._blocks = self._access = None
        self._handles = None
        self._db.close()
