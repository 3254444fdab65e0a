"""Disk-backed KV block store on RocksDB (rocksdict, raw mode: values are never pickled).

Column families:
- `blocks`: key = block hash (32 bytes), value = encoded block (cache/codec.py); blob files on
- `access`: key = block hash, value = <last access ms u64><hit count u32><size u32><depth u32>

Guarantees:
- every read is verified; a corrupt block is deleted, counted, and reported as a miss;
- writes are atomic batches; with sync="every_write" an acknowledged put survives a SIGKILL,
  with sync="interval" at most the last `sync_interval_ms` of puts can be lost, with "off"
  whatever the OS had not written;
- above `high_watermark * capacity_bytes` a background evictor deletes least-recently-used
  blocks down to `low_watermark * capacity_bytes`; among blocks of equal access time the deepest
  (a chain's tail) goes first, so a parent never leaves before its tail (a chain's blocks are
  touched together, parents at least as recently as their tails);
- blocks older than `max_age_s` (last access) are expired by our own sweeper;
- a failed write (disk full) makes the store refuse puts (StoreFull) for a cool-down while reads
  go on.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import rocksdict
from pdserve.cache.codec import verify_block
from pdserve.cache.errors import CacheError, CorruptBlock

log = logging.getLogger(__name__)

_ACCESS = struct.Struct("<QIII")
_STATS_KEY = b"pdserve:stats"  # lifetime counters, in the default column family
_COUNTERS = ("hits", "misses", "puts", "corrupt", "evicted", "expired", "write_errors")
SYNC_POLICIES = ("every_write", "interval", "off")
EVICT_BATCH = 256
GONE_MEMORY = 1 << 20  # evicted-key prefixes remembered (about 100 MiB at most)


class StoreFull(CacheError):
    """The disk refused a write; puts are refused for a while, reads go on."""


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
class _Meta:
    atime: int   # last access, unix ms
    hits: int
    size: int
    depth: int   # block index in its hash chain (0 = first block)

    def pack(self) -> bytes:
        return _ACCESS.pack(self.atime, self.hits, self.size, self.depth)

    @classmethod
    def unpack(cls, raw: bytes) -> _Meta:
        return cls(*_ACCESS.unpack(raw))


def _now_ms() -> int:
    return int(time.time() * 1000)


class BlockStore:
    def __init__(self, path: str | Path, sync: str = "every_write", sync_interval_ms: int = 100,
                 capacity_bytes: int = 0, high_watermark: float = 0.95,
                 low_watermark: float = 0.85, max_age_s: float = 0.0,
                 read_only: bool = False) -> None:
        if sync not in SYNC_POLICIES:
            raise ValueError(f"sync must be one of {SYNC_POLICIES}, got {sync!r}")
        if not 0 < low_watermark <= high_watermark <= 1:
            raise ValueError("watermarks must satisfy 0 < low <= high <= 1")
        Path(path).mkdir(parents=True, exist_ok=True)
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        blob_opts = rocksdict.Options(raw_mode=True)
        blob_opts.set_enable_blob_files(True)  # large values go to blob files, not the LSM
        blob_opts.set_min_blob_size(4096)
        blob_opts.set_enable_blob_gc(True)
        access = rocksdict.AccessType.read_only() if read_only else None
        kwargs = {"access_type": access} if access is not None else {}
        self._db = rocksdict.Rdict(
            str(path), options=opts,
            column_families={"blocks": blob_opts, "access": rocksdict.Options(raw_mode=True)},
            **kwargs)
        self._blocks = self._db.get_column_family("blocks")
        # Every block carries its own xxh3 checksum, verified on every read (codec.py); RocksDB's
        # second checksum over each blob record costs more than the read itself (reads of
        # 2.95 MB blocks: 1.4 GB/s with it, 2.6-4.8 GB/s without; bench/bench_store.py).
        self._reads = rocksdict.ReadOptions()
        self._reads.set_verify_checksums(False)
        self._blocks.set_read_options(self._reads)
        self._access = self._db.get_column_family("access")
        self._blocks_h = self._db.get_column_family_handle("blocks")
        self._access_h = self._db.get_column_family_handle("access")
        self.sync = sync
        self._wopt = rocksdict.WriteOptions()
        self._wopt.sync = sync == "every_write"
        self._lazy = rocksdict.WriteOptions()  # access times need no fsync
        self.capacity_bytes = capacity_bytes
        self.high = high_watermark
        self.low = low_watermark
        self.max_age_s = max_age_s
        self._lock = threading.Lock()        # guards stats and the metadata index
        self._meta: dict[bytes, _Meta] = {}  # in-memory copy of the access column family
        # Keys evicted or expired since start (8-byte prefixes, bounded): lets a Lookup tell a
        # miss on an evicted block from one on a block never stored, for the request ledger.
        self._gone: OrderedDict[bytes, None] = OrderedDict()
        self.stats = StoreStats()
        self._refuse_until = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._load_index()
        if not read_only:
            self._start(sync_interval_ms)

    # -- lifecycle ------------------------------------------------------------------------
    def _load_index(self) -> None:
        saved = self._db.get(_STATS_KEY)
        if saved is not None:  # lifetime counters of earlier runs
            for name, value in json.loads(saved).items():
                if name in _COUNTERS:
                    setattr(self.stats, name, int(value))
        for k, v in self._access.items():
            m = _Meta.unpack(v)
            self._meta[k] = m
            self.stats.num_bytes += m.size
        self.stats.num_blocks = len(self._meta)

    def _start(self, sync_interval_ms: int) -> None:
        self._threads.append(threading.Thread(target=self._maintain, name="kv-maintain",
                                              daemon=True))
        if self.sync == "interval":
            self._threads.append(threading.Thread(
                target=self._sync_loop, args=(sync_interval_ms / 1000,), name="kv-sync",
                daemon=True))
        for t in self._threads:
            t.start()

    def save_counters(self) -> None:
        with self._lock:
            counters = {n: getattr(self.stats, n) for n in _COUNTERS}
        self._db.put(_STATS_KEY, json.dumps(counters).encode(), self._lazy)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=10)
        if self._threads:
            self.save_counters()
        if self.sync != "off" and self._blocks is not None:
            try:
                self._db.flush_wal(True)
            except Exception:  # noqa: BLE001 - read-only stores have nothing to flush
                pass
        # Column-family handles keep the database open; drop them before closing.
        for name in ("_blocks", "_access", "_blocks_h", "_access_h"):
            setattr(self, name, None)
        self._db.close()

    @property
    def accepting_writes(self) -> bool:
        return time.monotonic() >= self._refuse_until

    # -- reads ----------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are stored (in-memory index; no block is read)."""
        n = 0
        with self._lock:
            for k in keys:
                if k not in self._meta:
                    break
                n += 1
        return n

    def present(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [k in self._meta for k in keys]

    def was_removed(self, keys: Sequence[bytes]) -> list[bool]:
        """Per key: absent now, and evicted or expired earlier in this process's life."""
        with self._lock:
            return [k not in self._meta and k[:8] in self._gone for k in keys]

    def _remember_gone(self, keys: Sequence[bytes]) -> None:  # caller holds self._lock
        for k in keys:
            self._gone[k[:8]] = None
        while len(self._gone) > GONE_MEMORY:
            self._gone.popitem(last=False)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes]:
        """Verified blocks for the leading keys; stops at the first missing or corrupt one."""
        out: list[bytes] = []
        for key in keys:
            try:
                value = self._read(key)
                if value is None:
                    break
                verify_block(key, value)
            except CorruptBlock as e:
                log.warning("corrupt block deleted", extra={"key": key.hex()[:16], "why": str(e)})
                self._delete([key])
                with self._lock:
                    self.stats.corrupt += 1
                break
            out.append(value)
        with self._lock:
            self.stats.hits += len(out)
            self.stats.misses += len(keys) - len(out)
        self._touch(keys[: len(out)])
        return out

    def _read(self, key: bytes) -> bytes | None:
        try:
            return self._blocks.get(key)
        except Exception as e:  # noqa: BLE001 - RocksDB reports a damaged blob file so
            raise CorruptBlock(f"unreadable: {e}") from e

    def _touch(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        now = _now_ms()  # one time for the whole chain: parents never older than their tails
        wb = rocksdict.WriteBatch(raw_mode=True)
        with self._lock:
            for key in keys:
                m = self._meta.get(key)
                if m is None:
                    continue
                m.atime, m.hits = now, m.hits + 1
                wb.put(key, m.pack(), self._access_h)
        try:
            self._db.write(wb, self._lazy)
        except Exception as e:  # noqa: BLE001 - access times are best effort
            log.warning("access time update failed", extra={"why": str(e)})

    # -- writes ---------------------------------------------------------------------------
    def put_many(self, items: Sequence[tuple[bytes, bytes]], depths: Sequence[int] | None = None) -> int:
        """Stores verified blocks in one atomic batch; returns how many were new.
        `depths[i]` is block i's index in its chain (eviction takes tails first)."""
        if not self.accepting_writes:
            raise StoreFull("the store is not accepting writes (the disk refused a write)")
        for key, value in items:
            verify_block(key, value)
        depths = list(depths) if depths is not None else [0] * len(items)
        now = _now_ms()
        wb = rocksdict.WriteBatch(raw_mode=True)
        new: dict[bytes, _Meta] = {}
        with self._lock:
            for (key, value), depth in zip(items, depths):
                if key in self._meta or key in new:
                    continue
                m = _Meta(now, 0, len(value), depth)
                wb.put(key, value, self._blocks_h)
                wb.put(key, m.pack(), self._access_h)
                new[key] = m
        if not new:
            return 0
        try:
            self._db.write(wb, self._wopt)
        except Exception as e:  # noqa: BLE001 - RocksDB raises plain exceptions for IO errors
            with self._lock:
                self.stats.write_errors += 1
            self._refuse_until = time.monotonic() + 5.0
            log.error("block write failed; refusing writes for 5 s", extra={"why": str(e)})
            raise StoreFull(f"the disk refused the write: {e}") from e
        with self._lock:
            self._meta.update(new)
            self.stats.puts += len(new)
            self.stats.num_blocks += len(new)
            self.stats.num_bytes += sum(m.size for m in new.values())
        if self.capacity_bytes and self.stats.num_bytes > self.high * self.capacity_bytes:
            self._wake.set()
        return len(new)

    def _delete(self, keys: Sequence[bytes]) -> int:
        wb = rocksdict.WriteBatch(raw_mode=True)
        freed = 0
        with self._lock:
            for key in keys:
                m = self._meta.pop(key, None)
                wb.delete(key, self._blocks_h)
                wb.delete(key, self._access_h)
                if m is not None:
                    freed += m.size
                    self.stats.num_blocks -= 1
            self.stats.num_bytes -= freed
        self._db.write(wb, self._wopt)
        return freed

    def raw_put(self, key: bytes, value: bytes) -> None:
        """Writes bytes as they are, unverified: for tests that corrupt blocks on purpose."""
        self._blocks[key] = value

    # -- eviction and expiry ------------------------------------------------------------------
    def eviction_order(self) -> list[bytes]:
        """All keys, first to go first: least recently used; at equal time, deepest first."""
        with self._lock:
            items = list(self._meta.items())
        items.sort(key=lambda kv: (kv[1].atime, -kv[1].depth, kv[0]))
        return [k for k, _ in items]

    def evict(self) -> int:
        """Evicts down to the low watermark if above the high one; returns blocks evicted."""
        if not self.capacity_bytes or self.stats.num_bytes <= self.high * self.capacity_bytes:
            return 0
        target = self.low * self.capacity_bytes
        order = self.eviction_order()
        n = 0
        # Small batches: lookups and gets interleave with eviction instead of waiting for it.
        while order and self.stats.num_bytes > target:
            batch, order = order[:EVICT_BATCH], order[EVICT_BATCH:]
            keep = []
            with self._lock:
                size = self.stats.num_bytes
            for k in batch:
                if size <= target:
                    break
                m = self._meta.get(k)
                if m is not None:
                    keep.append(k)
                    size -= m.size
            self._delete(keep)
            with self._lock:
                self._remember_gone(keep)
            n += len(keep)
        with self._lock:
            self.stats.evicted += n
        return n

    def expire(self, now_ms: int | None = None) -> int:
        """Deletes blocks not accessed for max_age_s; returns how many."""
        if self.max_age_s <= 0:
            return 0
        cutoff = (now_ms if now_ms is not None else _now_ms()) - int(self.max_age_s * 1000)
        with self._lock:
            old = [k for k, m in self._meta.items() if m.atime < cutoff]
        for i in range(0, len(old), EVICT_BATCH):
            self._delete(old[i:i + EVICT_BATCH])
        with self._lock:
            self.stats.expired += len(old)
            self._remember_gone(old)
        return len(old)

    def _maintain(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.evict()
                self.expire()
                self.save_counters()
            except Exception as e:  # noqa: BLE001 - keep the maintenance thread alive
                log.error("eviction failed", extra={"why": str(e)})

    def _sync_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self._db.flush_wal(True)
            except Exception as e:  # noqa: BLE001
                log.warning("WAL sync failed", extra={"why": str(e)})

    # -- offline tools ------------------------------------------------------------------------------
    def verify_all(self) -> tuple[int, list[tuple[bytes, str]]]:
        """Full scan with checksums: (blocks checked, [(key, problem)])."""
        bad: list[tuple[bytes, str]] = []
        n = 0
        # Our own checksum judges each block; RocksDB's would end the scan at the first
        # damaged blob record, hiding every block after it.
        it = self._blocks.iter(self._reads)
        it.seek_to_first()
        while it.valid():
            k, v = it.key(), it.value()
            n += 1
            try:
                verify_block(k, v)
            except CorruptBlock as e:
                bad.append((k, str(e)))
            if k not in self._meta:
                bad.append((k, "block without access metadata"))
            it.next()
        try:
            it.status()
        except Exception as e:  # noqa: BLE001 - the scan itself broke off
            bad.append((b"", f"scan stopped early: {e}"))
        del it
        for k in self._meta:
            if self._blocks.get(k) is None:
                bad.append((k, "metadata without block"))
        return n, bad
