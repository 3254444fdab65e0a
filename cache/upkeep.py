"""The block store's upkeep: eviction down the watermarks, age expiry, the periodic sync, and
the full verification scan. A mixin of BlockStore (cache/store.py), whose state it uses."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pdserve.cache.codec import verify_block
from pdserve.cache.errors import CorruptBlock
from pdserve.cache.records import now_ms as wall_ms

log = logging.getLogger("pdserve.cache.store")

EVICT_BATCH = 256
GONE_MEMORY = 1 << 20  # evicted-key prefixes remembered (about 100 MiB at most)


class Upkeep:
    """Eviction, expiry, syncing and verification of a BlockStore."""

    def _remember_gone(self, keys: Sequence[bytes]) -> None:  # caller holds self._lock
        for k in keys:
            self._gone[k[:8]] = None
        while len(self._gone) > GONE_MEMORY:
            self._gone.popitem(last=False)

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
        cutoff = (now_ms if now_ms is not None else wall_ms()) - int(self.max_age_s * 1000)
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
                self._segments.sync()  # the bytes before the locations that point at them
                self._db.flush_wal(True)
            except Exception as e:  # noqa: BLE001
                log.warning("WAL sync failed", extra={"why": str(e)})

    def verify_all(self) -> tuple[int, list[tuple[bytes, str]]]:
        """Full scan with checksums: (blocks checked, [(key, problem)])."""
        bad: list[tuple[bytes, str]] = []
        with self._lock:
            items = [(k, m.where()) for k, m in self._meta.items()]
        fds: dict[int, int] = {}
        try:
            for k, where in items:
                try:
                    verify_block(k, self._read(k, where, fds))
                except CorruptBlock as e:
                    bad.append((k, str(e)))
        finally:
            self._segments.close_all(fds)
        for k in self._blocks.keys():
            if k not in self._meta:
                bad.append((k, "block without access metadata"))
        return len(items), bad
