"""Disk-backed KV block store: RocksDB (rocksdict, raw mode: values are never pickled) for the
metadata, append-only segment files for the blocks' bytes (cache/segments.py says why).

Column families:
- `blocks`: key = block hash (32 bytes), value = where the encoded block (cache/codec.py) is:
  b"PDLC" <segment u64><offset u64><length u32>. Stores written before the segment files hold
  the encoded block itself here (blob files on); those blocks stay readable, and a writable
  open moves them into segments.
- `access`: key = block hash, value = <last access ms u64><hit count u32><size u32><depth u32>

Guarantees:
- every read is verified; a corrupt block is deleted, counted, and reported as a miss
  (the reads are in cache/reads.py, eviction, expiry and verification in cache/upkeep.py);
- a put appends its blocks to the active segment, then stores their locations and access
  records in one atomic RocksDB batch; with sync="every_write" both are synced before the put
  is acknowledged (the bytes first), so an acknowledged put survives a SIGKILL or power loss;
  with sync="interval" at most the last `sync_interval_ms` of puts can be lost, with "off"
  whatever the OS had not written. A location whose bytes were lost fails verification: a miss;
- above `high_watermark * capacity_bytes` a background evictor deletes least-recently-used
  blocks down to `low_watermark * capacity_bytes`; among blocks of equal access time the deepest
  (a chain's tail) goes first, so a parent never leaves before its tail (a chain's blocks are
  touched together, parents at least as recently as their tails);
- blocks older than `max_age_s` (last access) are expired by our own sweeper;
- a failed write (disk full) makes the store refuse puts (StoreFull) for a cool-down while reads
  go on.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import rocksdict
from pdserve.cache.codec import MAGIC as BLOCK_MAGIC
from pdserve.cache.codec import verify_block
from pdserve.cache.reads import Reads
from pdserve.cache.records import LOC, LOC_MAGIC, Meta, StoreFull, StoreStats, now_ms
from pdserve.cache.segments import SEGMENT_BYTES, Segments
from pdserve.cache.upkeep import Upkeep

log = logging.getLogger(__name__)

_STATS_KEY = b"pdserve:stats"  # lifetime counters, in the default column family
_COUNTERS = ("hits", "misses", "puts", "corrupt", "evicted", "expired", "write_errors")
SYNC_POLICIES = ("every_write", "interval", "off")


class BlockStore(Reads, Upkeep):
    def __init__(self, path: str | Path, sync: str = "every_write", sync_interval_ms: int = 100,
                 capacity_bytes: int = 0, high_watermark: float = 0.95,
                 low_watermark: float = 0.85, max_age_s: float = 0.0,
                 read_only: bool = False, segment_bytes: int = SEGMENT_BYTES) -> None:
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
        # second checksum over the blob records of old stores costs more than the read itself.
        self._reads = rocksdict.ReadOptions()
        self._reads.set_verify_checksums(False)
        self._blocks.set_read_options(self._reads)
        self._access = self._db.get_column_family("access")
        self._blocks_h = self._db.get_column_family_handle("blocks")
        self._access_h = self._db.get_column_family_handle("access")
        self.sync = sync
        self.read_only = read_only
        self._wopt = rocksdict.WriteOptions()
        self._wopt.sync = sync == "every_write"
        self._lazy = rocksdict.WriteOptions()  # access times need no fsync
        self.capacity_bytes = capacity_bytes
        self.high = high_watermark
        self.low = low_watermark
        self.max_age_s = max_age_s
        self._lock = threading.Lock()        # guards stats and the metadata index
        self._write_lock = threading.Lock()  # one segment append + metadata batch at a time
        self._segments = Segments(Path(path), sync, segment_bytes, read_only)
        self._meta: dict[bytes, Meta] = {}  # in-memory copy of the access column family
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
            removed, cut = self._segments.recover(self._live_segments())
            if removed or cut:
                log.info("segments tidied after an unclean stop",
                         extra={"files_removed": removed, "bytes_cut": cut})
            self._move_old_values()
            self._start(sync_interval_ms)

    # -- lifecycle ------------------------------------------------------------------------
    def _load_index(self) -> None:
        saved = self._db.get(_STATS_KEY)
        if saved is not None:  # lifetime counters of earlier runs
            for name, value in json.loads(saved).items():
                if name in _COUNTERS:
                    setattr(self.stats, name, int(value))
        for k, v in self._access.items():
            m = Meta.unpack(v)
            self._meta[k] = m
            self.stats.num_bytes += m.size
        self.stats.num_blocks = len(self._meta)
        self._old_values = 0  # blocks whose bytes are still in the `blocks` column family
        for k, v in self._blocks.items():
            m = self._meta.get(k)
            if m is None:
                continue
            if len(v) == LOC.size and v[:4] == LOC_MAGIC:
                _, m.seg, m.off, _ = LOC.unpack(v)
            else:
                self._old_values += 1

    def _live_segments(self) -> dict[int, tuple[int, int]]:
        live: dict[int, tuple[int, int]] = {}
        for m in self._meta.values():
            if m.seg >= 0:
                n, end = live.get(m.seg, (0, 0))
                live[m.seg] = (n + 1, max(end, m.off + m.size))
        return live

    def _move_old_values(self) -> None:
        """Moves blocks written by the blob-file layout into segments, a few at a time."""
        if not self._old_values:
            return
        log.info("moving blocks into segment files", extra={"blocks": self._old_values})
        batch: list[tuple[bytes, bytes]] = []
        # Lazily: an old store's values are whole blocks, too many to hold in memory at once.
        for k, v in itertools.chain(self._blocks.items(), [(None, None)]):
            m = self._meta.get(k) if k is not None else None
            if m is not None and m.seg < 0 and v[:4] == BLOCK_MAGIC:
                batch.append((k, v))
            if batch and (len(batch) == 16 or k is None):
                try:
                    self._write(batch, [self._meta[key].depth for key, _ in batch], replace=True)
                except StoreFull:
                    log.warning("blocks left in the old layout (the disk refused the move)")
                    return
                batch = []
        self._old_values = 0

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
        self._segments.close()
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

    def sizes(self, keys: Sequence[bytes]) -> list[int]:
        """Stored sizes of the leading stored keys' blocks (header included)."""
        out = []
        with self._lock:
            for k in keys:
                m = self._meta.get(k)
                if m is None:
                    break
                out.append(m.where()[2])
        return out

    def was_removed(self, keys: Sequence[bytes]) -> list[bool]:
        """Per key: absent now, and evicted or expired earlier in this process's life."""
        with self._lock:
            return [k not in self._meta and k[:8] in self._gone for k in keys]

    # -- writes ---------------------------------------------------------------------------
    def put_many(self, items: Sequence[tuple[bytes, bytes]], depths: Sequence[int] | None = None) -> int:
        """Stores verified blocks (bytes appended to a segment, then their locations and access
        records in one atomic batch); returns how many were new. `depths[i]` is block i's index
        in its chain (eviction takes tails first)."""
        if not self.accepting_writes:
            raise StoreFull("the store is not accepting writes (the disk refused a write)")
        for key, value in items:
            verify_block(key, value)
        depths = list(depths) if depths is not None else [0] * len(items)
        n = self._write(items, depths)
        if n:
            with self._lock:
                self.stats.puts += n
        if self.capacity_bytes and self.stats.num_bytes > self.high * self.capacity_bytes:
            self._wake.set()
        return n

    def _write(self, items: Sequence[tuple[bytes, bytes]], depths: Sequence[int],
               replace: bool = False) -> int:
        """Appends the blocks not stored yet (all of them with `replace`) and records where
        they are; returns how many were written."""
        now = now_ms()
        with self._write_lock:
            new: dict[bytes, Meta] = {}
            values: list[bytes] = []
            with self._lock:
                for (key, value), depth in zip(items, depths):
                    prev = self._meta.get(key)
                    if key in new or (prev is not None and not replace):
                        continue
                    new[key] = (Meta(now, 0, len(value), depth) if prev is None else
                                Meta(prev.atime, prev.hits, len(value), depth))
                    values.append(value)
            if not new:
                return 0
            try:
                seg, start = self._segments.append(values)
            except OSError as e:
                self._refuse(e)
            wb = rocksdict.WriteBatch(raw_mode=True)
            off = start
            for key, m in new.items():
                m.seg, m.off = seg, off
                off += m.size
                wb.put(key, m.loc(), self._blocks_h)
                wb.put(key, m.pack(), self._access_h)
            try:
                self._db.write(wb, self._wopt)
            except Exception as e:  # noqa: BLE001 - RocksDB raises plain exceptions for IO errors
                self._segments.undo(seg, start)
                self._refuse(e)
            self._segments.added(seg, len(new))
            freed = []
            with self._lock:
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
        self._segments.release(freed)
        return len(new)

    def _refuse(self, e: BaseException) -> NoReturn:
        with self._lock:
            self.stats.write_errors += 1
        self._refuse_until = time.monotonic() + 5.0
        log.error("block write failed; refusing writes for 5 s", extra={"why": str(e)})
        raise StoreFull(f"the disk refused the write: {e}") from e

    def _delete(self, keys: Sequence[bytes]) -> int:
        wb = rocksdict.WriteBatch(raw_mode=True)
        freed = 0
        ranges = []
        with self._lock:
            for key in keys:
                m = self._meta.pop(key, None)
                wb.delete(key, self._blocks_h)
                wb.delete(key, self._access_h)
                if m is not None:
                    freed += m.size
                    self.stats.num_blocks -= 1
                    if m.seg >= 0:
                        ranges.append(m.where())
            self.stats.num_bytes -= freed
        self._db.write(wb, self._wopt)
        self._segments.release(ranges)  # after the locations are gone
        return freed

    def raw_put(self, key: bytes, value: bytes) -> None:
        """Stores bytes as they are, unverified, in place of the key's block: for tests that
        corrupt blocks on purpose."""
        with self._lock:
            m = self._meta.get(key)
        self._write([(key, value)], [m.depth if m is not None else 0], replace=True)

    def bytes_on_disk(self) -> int:
        """Space the segment files take on disk (freed ranges excluded)."""
        return self._segments.bytes_on_disk()
