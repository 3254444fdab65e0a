"""The block store's upkeep: eviction down the watermarks, age expiry, the periodic sync, the
lifetime counters saved, and the full verification scan. One maintenance thread (and, with
sync="interval", one sync thread); lookups never wait for it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from pdserve.cache.block_hash import BlockHash
from pdserve.cache.catalog import Catalog
from pdserve.cache.codec import verify_block
from pdserve.cache.errors import CorruptBlock
from pdserve.cache.reader import BlockReader
from pdserve.cache.segments import Segments

log = logging.getLogger("pdserve.cache.store")

EVICT_BATCH = 256
MAINTAIN_EVERY_S = 1.0


class Upkeep:
    def __init__(self, catalog: Catalog, segments: Segments, reader: BlockReader,
                 drop: Callable[[Sequence[BlockHash], bool], None], capacity_bytes: int,
                 high_watermark: float, low_watermark: float, max_age_s: float) -> None:
        self.catalog = catalog
        self.segments = segments
        self.reader = reader
        self._drop = drop
        self.capacity_bytes = capacity_bytes
        self.high = high_watermark
        self.low = low_watermark
        self.max_age_s = max_age_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, sync_interval_s: float | None) -> None:
        self._threads.append(threading.Thread(target=self._maintain, name="kv-maintain",
                                              daemon=True))
        if sync_interval_s is not None:
            self._threads.append(threading.Thread(target=self._sync_loop,
                                                  args=(sync_interval_s,), name="kv-sync",
                                                  daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> bool:
        """Stops the threads; True when there were any (a writable store)."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=10)
        return bool(self._threads)

    def over_capacity(self) -> bool:
        return bool(self.capacity_bytes) and \
            self.catalog.stats.num_bytes > self.high * self.capacity_bytes

    def wake(self) -> None:
        """A put took the store above the high watermark: evict now."""
        self._wake.set()

    # -- eviction and expiry ----------------------------------------------------------------
    def evict(self) -> int:
        """Evicts down to the low watermark if above the high one; returns blocks evicted."""
        if not self.over_capacity():
            return 0
        target = self.low * self.capacity_bytes
        order = self.catalog.eviction_order()
        n = 0
        # Small batches: lookups and gets interleave with eviction instead of waiting for it.
        while order and self.catalog.stats.num_bytes > target:
            batch, order = order[:EVICT_BATCH], order[EVICT_BATCH:]
            size = self.catalog.stats.num_bytes
            keep = []
            for k in batch:
                if size <= target:
                    break
                m = self.catalog.meta(k)
                if m is not None:
                    keep.append(k)
                    size -= m.size
            self._drop(keep, True)
            n += len(keep)
        self.catalog.count("evicted", n)
        return n

    def expire(self, now_ms: int | None = None) -> int:
        """Deletes blocks not accessed for max_age_s; returns how many."""
        if self.max_age_s <= 0:
            return 0
        now = now_ms if now_ms is not None else self.catalog.clock_ms()
        old = self.catalog.accessed_before(now - int(self.max_age_s * 1000))
        for i in range(0, len(old), EVICT_BATCH):
            self._drop(old[i:i + EVICT_BATCH], True)
        self.catalog.count("expired", len(old))
        return len(old)

    def _maintain(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=MAINTAIN_EVERY_S)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.evict()
                self.expire()
                self.catalog.save_counters()
            except Exception as e:  # noqa: BLE001 - keep the maintenance thread alive
                log.error("eviction failed", extra={"why": str(e)})

    def _sync_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.segments.sync()  # the bytes before the locations that point at them
                self.catalog.flush_wal()
            except Exception as e:  # noqa: BLE001
                log.warning("WAL sync failed", extra={"why": str(e)})

    # -- verification -----------------------------------------------------------------------
    def verify_all(self) -> tuple[int, list[tuple[BlockHash, str]]]:
        """Full scan with checksums: (blocks checked, [(key, problem)])."""
        bad: list[tuple[BlockHash, str]] = []
        items = self.catalog.items()
        fds: dict[int, int] = {}
        try:
            for k, where in items:
                try:
                    verify_block(k, self.reader.read(k, where, fds))
                except CorruptBlock as e:
                    bad.append((k, str(e)))
        finally:
            self.segments.close_all(fds)
        bad.extend((k, "block without access metadata") for k in self.catalog.orphans())
        return len(items), bad
