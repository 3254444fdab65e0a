"""Append-only segment files holding the stored blocks' bytes; RocksDB keeps where each block
is (cache/store.py), as 3FS keeps its chunk metadata in RocksDB and the chunks in files.

Why not RocksDB blob files (the first layout): a synced put wrote every byte twice (WAL, then
the blob file), and a get copied every byte three times (page cache, blob buffer, pinned value,
Python bytes), which capped the store at about 0.5x a plain file write and 0.35x a plain read.
Here a put is one `writev` + `fdatasync` of the batch plus a small synced RocksDB batch of
locations, and a get is one `pread` per block (bench/bench_store.py).

Layout: `<store>/segments/<id:016x>.seg`, blocks back to back. One segment is written at a time
(the active one); a batch that would take it past `segment_bytes` starts a new one (a batch
larger than that fills a segment alone), and so does every restart. So a segment either stays
within `segment_bytes` or is one batch that never grows: the kvstore maps each file once, at
that size, and new blocks need no new mapping (services/kvstore/staging.py). When a
block leaves the store its byte range is freed at once by punching a hole (fallocate), and a
segment left without any live block is unlinked. At start, each segment is cut after its last
live block (a crash can leave the bytes of an unacknowledged put behind) and segments without a
live block are removed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

SEGMENT_BYTES = 64 << 20
_IOV_MAX = 512
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _fallocate()


def write_all(fd: int, values: Sequence[bytes | memoryview]) -> int:
    """Writes the buffers back to back with as few `writev` calls as the kernel allows."""
    total = 0
    pending = [memoryview(v).cast("B") for v in values if len(v)]
    while pending:
        n = os.writev(fd, pending[:_IOV_MAX])
        total += n
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]
    return total


class Segments:
    def __init__(self, root: Path, sync: str = "every_write", segment_bytes: int = SEGMENT_BYTES,
                 read_only: bool = False) -> None:
        self.dir = Path(root) / "segments"
        self.sync_writes = sync == "every_write"  # fdatasync every append
        self.durable = sync != "off"  # sync new files' names, and segments when closed
        self.segment_bytes = segment_bytes
        self.read_only = read_only
        if not read_only:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the live counts and the active segment
        self._live: dict[int, int] = {}  # segment id -> live blocks
        self._active = -1  # the segment appended to (open while _fd >= 0)
        self._next = 1
        self._fd = -1
        self._size = 0
        self._dirty = False  # the active segment has writes not yet synced
        self._punch = _FALLOCATE is not None

    @property
    def can_punch_holes(self) -> bool:
        """False once the filesystem refused to free part of a file."""
        return self._punch

    def path(self, seg: int) -> Path:
        return self.dir / f"{seg:016x}.seg"

    def on_disk(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        ids = []
        for p in self.dir.glob("*.seg"):
            try:
                ids.append(int(p.stem, 16))
            except ValueError:
                continue
        return sorted(ids)

    # -- start ------------------------------------------------------------------------------
    def recover(self, live: dict[int, tuple[int, int]]) -> tuple[int, int]:
        """`live[seg]` = (live blocks, end of the last live block). Removes segment files without
        a live block and cuts the others after their last one; returns (files removed, bytes cut).
        The next write goes to a new segment."""
        removed = cut = 0
        on_disk = self.on_disk()
        for seg in on_disk:
            p = self.path(seg)
            if seg not in live:
                p.unlink(missing_ok=True)
                removed += 1
                continue
            end = live[seg][1]
            size = p.stat().st_size
            if size > end:
                os.truncate(p, end)
                cut += size - end
        self._live = {seg: n for seg, (n, _) in live.items()}
        self._next = max([*on_disk, *live, 0]) + 1
        if removed or cut:
            self._sync_dir()
        return removed, cut

    # -- writes (the caller serialises them) ------------------------------------------------
    def append(self, values: Sequence[bytes | memoryview]) -> tuple[int, int]:
        """Appends the values back to back to the active segment, synced when the policy says
        so; returns (segment, offset of the first). On an error nothing stays appended."""
        incoming = sum(memoryview(v).nbytes for v in values)
        if self._fd < 0 or (self._size and self._size + incoming > self.segment_bytes):
            self._roll()
        start = self._size
        try:
            n = write_all(self._fd, values)
            if self.sync_writes:
                os.fdatasync(self._fd)
        except OSError:
            self._cut_back(start)
            raise
        self._size += n
        self._dirty = not self.sync_writes
        return self._active, start

    def undo(self, seg: int, start: int) -> None:
        """Drops what the last `append` wrote (its metadata could not be stored)."""
        if seg == self._active and self._fd >= 0:
            self._cut_back(start)

    def _cut_back(self, start: int) -> None:
        try:
            os.ftruncate(self._fd, start)
            self._size = start
        except OSError as e:
            # The tail stays as unreferenced bytes; the next start cuts it. Start a new segment
            # so that offsets stay right.
            log.warning("could not cut back a failed segment write", extra={"why": str(e)})
            self._close_active()

    def _roll(self) -> None:
        with self._lock:
            old = self._active
            self._close_active()
            new, self._next = self._next, self._next + 1
            fd = os.open(self.path(new), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            self._active, self._fd, self._size = new, fd, 0
            empty_old = old >= 0 and not self._live.get(old)
        if self.durable:
            self._sync_dir()  # the new file's name must be durable before blocks point into it
        if empty_old:
            self._unlink(old)

    def _close_active(self) -> None:
        if self._fd >= 0:
            if self._dirty and self.durable:
                os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd, self._dirty = -1, False

    def added(self, seg: int, n: int) -> None:
        with self._lock:
            self._live[seg] = self._live.get(seg, 0) + n

    def sync(self) -> None:
        """Makes the active segment's writes durable (sync="interval" calls it on its tick,
        before the RocksDB WAL, so that no synced location points at unsynced bytes)."""
        with self._lock:
            fd, dirty = self._fd, self._dirty
            self._dirty = False
        if fd >= 0 and dirty:
            try:
                os.fdatasync(fd)
            except OSError:
                with self._lock:
                    self._dirty = True
                raise

    def close(self) -> None:
        with self._lock:
            self._close_active()

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reads --------------------------------------------------------------------------------
    def read(self, seg: int, off: int, length: int, fds: dict[int, int]) -> bytes:
        """One block's bytes (FileNotFoundError if its segment is gone). `fds` caches open
        files for the caller; `close_all(fds)` closes them."""
        fd = fds.get(seg)
        if fd is None:
            fd = fds[seg] = os.open(self.path(seg), os.O_RDONLY)
        return os.pread(fd, length, off)

    def read_into(self, seg: int, off: int, dest: memoryview, fds: dict[int, int]) -> int:
        """Reads into `dest` (one copy, page cache to the caller's memory); returns bytes read."""
        fd = fds.get(seg)
        if fd is None:
            fd = fds[seg] = os.open(self.path(seg), os.O_RDONLY)
        return os.preadv(fd, [dest], off)

    @staticmethod
    def close_all(fds: dict[int, int]) -> None:
        for fd in fds.values():
            os.close(fd)
        fds.clear()

    # -- freeing --------------------------------------------------------------------------------
    def release(self, ranges: Sequence[tuple[int, int, int]]) -> None:
        """Frees the byte ranges (segment, offset, length) of blocks that left the store."""
        by_seg: dict[int, list[tuple[int, int]]] = {}
        for seg, off, length in ranges:
            by_seg.setdefault(seg, []).append((off, length))
        for seg, rs in by_seg.items():
            with self._lock:
                left = self._live.get(seg, 0) - len(rs)
                if left > 0:
                    self._live[seg] = left
                else:
                    self._live.pop(seg, None)
                gone = left <= 0 and seg != self._active
            if gone:
                self._unlink(seg)
            elif self._punch:
                self._punch_holes(seg, rs)

    def _unlink(self, seg: int) -> None:
        try:
            self.path(seg).unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove a segment", extra={"segment": seg, "why": str(e)})

    def _punch_holes(self, seg: int, ranges: Sequence[tuple[int, int]]) -> None:
        fallocate = _FALLOCATE
        if fallocate is None:
            return
        try:
            fd = os.open(self.path(seg), os.O_WRONLY)
        except FileNotFoundError:
            return
        try:
            for off, length in ranges:
                if fallocate(fd, _PUNCH_HOLE, off, length) != 0:
                    err = ctypes.get_errno()
                    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        self._punch = False
                        log.warning("this filesystem cannot free parts of a file; evicted bytes "
                                    "are freed when their whole segment is empty")
                        return
                    log.warning("could not free an evicted block's bytes",
                                extra={"segment": seg, "why": os.strerror(err)})
        finally:
            os.close(fd)

    def bytes_on_disk(self) -> int:
        """Space the segment files take (allocated blocks, holes excluded)."""
        total = 0
        for seg in self.on_disk():
            try:
                total += self.path(seg).stat().st_blocks * 512
            except FileNotFoundError:
                continue
        return total
