"""Disk-backed KV block store: the catalog of what it holds in RocksDB (cache/catalog.py), the
blocks' bytes in append-only segment files (cache/segments.py says why), verified reads
(cache/reader.py) and upkeep (cache/upkeep.py), composed here with the writes.

Guarantees:
- every read is verified; a corrupt block is deleted, counted, and reported as a miss;
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

import logging
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from pdserve.cache.block_hash import BlockHash
from pdserve.cache.catalog import Catalog, Where
from pdserve.cache.codec import MAGIC as BLOCK_MAGIC
from pdserve.cache.codec import verify_block
from pdserve.cache.reader import BlockReader
from pdserve.cache.records import Meta, StoreFull, StoreStats, now_ms
from pdserve.cache.segments import SEGMENT_BYTES, Segments
from pdserve.cache.upkeep import Upkeep

log = logging.getLogger(__name__)

SYNC_POLICIES = ("every_write", "interval", "off")
REFUSE_WRITES_S = 5.0  # after the disk refused a write
MOVE_BATCH = 16  # old-layout blocks moved into segments per write


@dataclass(frozen=True)
class BlockLocation:
    """Where a block's bytes are on disk (for tools and tests that inspect or damage them)."""

    path: Path
    offset: int
    length: int


class BlockStore:
    def __init__(self, path: str | Path, sync: str = "every_write", sync_interval_ms: int = 100,
                 capacity_bytes: int = 0, high_watermark: float = 0.95,
                 low_watermark: float = 0.85, max_age_s: float = 0.0,
                 read_only: bool = False, segment_bytes: int = SEGMENT_BYTES,
                 clock_ms: Callable[[], int] = now_ms) -> None:
        if sync not in SYNC_POLICIES:
            raise ValueError(f"sync must be one of {SYNC_POLICIES}, got {sync!r}")
        if not 0 < low_watermark <= high_watermark <= 1:
            raise ValueError("watermarks must satisfy 0 < low <= high <= 1")
        Path(path).mkdir(parents=True, exist_ok=True)
        self.sync = sync
        self.read_only = read_only
        self.catalog = Catalog(Path(path), sync == "every_write", read_only, clock_ms)
        self.segments = Segments(Path(path), sync, segment_bytes, read_only)
        self.reader = BlockReader(self.catalog, self.segments, lambda keys: self._drop(keys))
        self.upkeep = Upkeep(self.catalog, self.segments, self.reader, self._drop,
                             capacity_bytes, high_watermark, low_watermark, max_age_s)
        self._write_lock = threading.Lock()  # one segment append + metadata batch at a time
        self._refuse_until = 0.0
        if not read_only:
            removed, cut = self.segments.recover(self.catalog.live_segments())
            if removed or cut:
                log.info("segments tidied after an unclean stop",
                         extra={"files_removed": removed, "bytes_cut": cut})
            self._move_old_values()
            self.upkeep.start(sync_interval_ms / 1000 if sync == "interval" else None)

    # -- what it holds --------------------------------------------------------------------
    @property
    def stats(self) -> StoreStats:
        return self.catalog.stats

    @property
    def capacity_bytes(self) -> int:
        return self.upkeep.capacity_bytes

    @property
    def accepting_writes(self) -> bool:
        return time.monotonic() >= self._refuse_until

    def lookup(self, keys: Sequence[BlockHash]) -> int:
        """How many leading keys are stored (in-memory index; no block is read)."""
        return self.catalog.lookup(keys)

    def present(self, keys: Sequence[BlockHash]) -> list[bool]:
        return self.catalog.present(keys)

    def sizes(self, keys: Sequence[BlockHash]) -> list[int]:
        """Stored sizes of the leading stored keys' blocks (header included)."""
        return self.catalog.sizes(keys)

    def was_removed(self, keys: Sequence[BlockHash]) -> list[bool]:
        """Per key: absent now, and evicted or expired earlier in this process's life."""
        return self.catalog.was_removed(keys)

    def location(self, key: BlockHash) -> BlockLocation | None:
        where = self.catalog.where(key)
        if where is None or where[0] < 0:
            return None
        seg, off, size = where
        return BlockLocation(self.segments.path(seg), off, size)

    def bytes_on_disk(self) -> int:
        """Space the segment files take on disk (freed ranges excluded)."""
        return self.segments.bytes_on_disk()

    # -- reads (cache/reader.py) ------------------------------------------------------------
    def get_many(self, keys: Sequence[BlockHash]) -> list[bytes]:
        return self.reader.get_many(keys)

    def get_into(self, keys: Sequence[BlockHash], out: memoryview | bytearray,
                 verify: bool = True) -> list[int]:
        return self.reader.get_into(keys, out, verify)

    def get_parts(self, keys: Sequence[BlockHash], cuts: Sequence[int]
                  ) -> Generator[list[bytes], None, None]:
        return self.reader.get_parts(keys, cuts)

    def locate(self, keys: Sequence[BlockHash]) -> list[tuple[Where, bytes]]:
        return self.reader.locate(keys)

    def segment_path(self, seg: int) -> Path:
        return self.segments.path(seg)

    # -- upkeep (cache/upkeep.py) --------------------------------------------------------------
    def eviction_order(self) -> list[BlockHash]:
        return self.catalog.eviction_order()

    def evict(self) -> int:
        return self.upkeep.evict()

    def expire(self, now_ms: int | None = None) -> int:
        return self.upkeep.expire(now_ms)

    def verify_all(self) -> tuple[int, list[tuple[BlockHash, str]]]:
        return self.upkeep.verify_all()

    # -- writes ---------------------------------------------------------------------------
    def put_many(self, items: Sequence[tuple[BlockHash, bytes]],
                 depths: Sequence[int] | None = None) -> int:
        """Stores verified blocks (bytes appended to a segment, then their locations and access
        records in one atomic batch); returns how many were new. `depths[i]` is block i's index
        in its chain (eviction takes tails first)."""
        if not self.accepting_writes:
            raise StoreFull("the store is not accepting writes (the disk refused a write)")
        for key, value in items:
            verify_block(key, value)
        n = self._write(items, list(depths) if depths is not None else [0] * len(items))
        if n:
            self.catalog.count("puts", n)
        if self.upkeep.over_capacity():
            self.upkeep.wake()
        return n

    def _write(self, items: Sequence[tuple[BlockHash, bytes]], depths: Sequence[int],
               replace: bool = False) -> int:
        """Appends the blocks not stored yet (all of them with `replace`) and records where
        they are; returns how many were written."""
        with self._write_lock:
            new = self.catalog.new_entries(
                [(k, len(v), d) for (k, v), d in zip(items, depths)], replace)
            if not new:
                return 0
            values = dict(items)
            try:
                seg, start = self.segments.append([values[k] for k in new])
            except OSError as e:
                self._refuse(e)
            off = start
            for m in new.values():
                m.seg, m.off = seg, off
                off += m.size
            try:
                freed = self.catalog.record(new)
            except Exception as e:  # noqa: BLE001 - RocksDB raises plain exceptions for IO errors
                self.segments.undo(seg, start)
                self._refuse(e)
            self.segments.added(seg, len(new))
        self.segments.release(freed)
        return len(new)

    def _refuse(self, e: BaseException) -> NoReturn:
        self.catalog.count("write_errors")
        self._refuse_until = time.monotonic() + REFUSE_WRITES_S
        log.error("block write failed; refusing writes for a while",
                  extra={"why": str(e), "seconds": REFUSE_WRITES_S})
        raise StoreFull(f"the disk refused the write: {e}") from e

    def delete(self, keys: Sequence[BlockHash]) -> None:
        """Deletes the blocks (as eviction does, without remembering them as evicted)."""
        self._drop(keys)

    def _drop(self, keys: Sequence[BlockHash], gone: bool = False) -> None:
        """Deletes the keys and frees their bytes (after their locations are gone)."""
        self.segments.release(self.catalog.remove(keys, gone))

    def _move_old_values(self) -> None:
        """Moves blocks written by the blob-file layout into segments, a few at a time."""
        if not self.catalog.num_old_values:
            return
        log.info("moving blocks into segment files",
                 extra={"blocks": self.catalog.num_old_values})
        batch: list[tuple[BlockHash, bytes]] = []
        # Lazily: an old store's values are whole blocks, too many to hold in memory at once.
        for k, v in self.catalog.old_values():
            if v[:4] != BLOCK_MAGIC:
                continue
            batch.append((k, v))
            if len(batch) == MOVE_BATCH and not self._move(batch):
                return
            if len(batch) == MOVE_BATCH:
                batch = []
        if batch and not self._move(batch):
            return
        self.catalog.num_old_values = 0

    def _move(self, batch: list[tuple[BlockHash, bytes]]) -> bool:
        depths = [m.depth if (m := self.catalog.meta(k)) is not None else 0 for k, _ in batch]
        try:
            self._write(batch, depths, replace=True)
        except StoreFull:
            log.warning("blocks left in the old layout (the disk refused the move)")
            return False
        return True

    def raw_put(self, key: BlockHash, value: bytes) -> None:
        """Stores bytes as they are, unverified, in place of the key's block: for tests that
        corrupt blocks on purpose."""
        m = self.catalog.meta(key)
        self._write([(key, value)], [m.depth if m is not None else 0], replace=True)

    def raw_old_block(self, key: BlockHash, value: bytes, meta: Meta) -> None:
        """Writes a block in the old (blob value) layout: for tests of the move."""
        self.catalog.raw_write(key, value, meta.pack())

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        if self.upkeep.stop():
            self.catalog.save_counters()
        self.segments.close()
        self.catalog.close(flush=self.sync != "off")
