"""The block store's reads: whole blocks (get_many), into the caller's memory (get_into), in
parts across a chain (get_parts), every one verified, with a corrupt block deleted and counted
and a block evicted mid-read served as a miss."""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence

import xxhash

from pdserve.cache.block_hash import BlockHash
from pdserve.cache.catalog import Catalog, Where
from pdserve.cache.codec import CHECKSUM_MISMATCH, HEADER_SIZE, check_header, verify_block
from pdserve.cache.errors import CorruptBlock
from pdserve.cache.segments import Segments

log = logging.getLogger("pdserve.cache.store")

READ_CHUNK = 1 << 20  # get_into checksums each chunk while it is still in the CPU cache

ReadOne = Callable[[BlockHash, Where, dict[int, int]], bool]


class BlockReader:
    """Verified reads of a BlockStore's blocks; `drop` deletes a key and frees its bytes."""

    def __init__(self, catalog: Catalog, segments: Segments,
                 drop: Callable[[Sequence[BlockHash]], None]) -> None:
        self.catalog = catalog
        self.segments = segments
        self._drop = drop

    def get_many(self, keys: Sequence[BlockHash]) -> list[bytes]:
        """Verified blocks for the leading keys; stops at the first missing or corrupt one."""
        out: list[bytes] = []

        def read(key: BlockHash, where: Where, fds: dict[int, int]) -> bool:
            value = self._read(key, where, fds)
            verify_block(key, value)
            out.append(value)
            return True

        self._fetch(keys, read)
        return out

    def get_into(self, keys: Sequence[BlockHash], out: memoryview | bytearray,
                 verify: bool = True) -> list[int]:
        """Reads the verified blocks of the leading keys back to back into `out` (the caller's
        memory: a staging buffer, a registered NIXL region) and returns their lengths; stops at
        the first missing or corrupt block, or at the first that does not fit. Each block is
        read in cache-sized chunks and checksummed while the chunk is hot, so its bytes cross
        memory once (get_many copies them, then checksums them). `verify=False` checks the
        headers only (key, layout, sizes): for a reader that checks every payload against its
        header's checksum itself, end to end (the NIXL staging path), and reports a mismatch
        back for `get_many` to verify and delete."""
        dest = memoryview(out).cast("B")
        lengths: list[int] = []
        pos = 0

        def read(key: BlockHash, where: Where, fds: dict[int, int]) -> bool:
            nonlocal pos
            size = where[2]
            if pos + size > len(dest):
                return False
            self._read_into(key, where, fds, dest[pos:pos + size], verify)
            lengths.append(size)
            pos += size
            return True

        self._fetch(keys, read)
        return lengths

    def locate(self, keys: Sequence[BlockHash]) -> list[tuple[Where, bytes]]:
        """Where the leading stored blocks lie in their segment files, with their headers
        (checked: key, layout, sizes), for a reader that READs them in place and checks each
        payload against its header's checksum itself (the NIXL staging path maps the segment
        files). Stops at the first block missing, kept outside a segment (an old store's), or
        with a bad header (deleted and counted)."""
        out: list[tuple[Where, bytes]] = []

        def read(key: BlockHash, where: Where, fds: dict[int, int]) -> bool:
            seg, off, size = where
            if seg < 0:
                return False
            header = bytearray(HEADER_SIZE)
            try:
                got = self.segments.read_into(seg, off, memoryview(header), fds)
            except FileNotFoundError as e:
                raise CorruptBlock("segment file missing") from e
            except OSError as e:
                raise CorruptBlock(f"unreadable: {e}") from e
            if got != HEADER_SIZE:
                raise CorruptBlock(f"segment holds {got} of the block's {size} bytes")
            check_header(key, memoryview(header), size)
            out.append((where, bytes(header)))
            return True

        self._fetch(keys, read)
        return out

    def get_parts(self, keys: Sequence[BlockHash], cuts: Sequence[int]
                  ) -> Generator[list[bytes], None, None]:
        """The leading stored blocks in parts (kvstore.proto, GetRequest.part_cuts): yields
        part 0 of every block (header and payload[:cuts[0]]), then part 1 of every block, and
        so on; with cuts at layer boundaries a reader has the first layers of a whole chain
        before the rest. Which blocks are sent is settled by part 0 (the leading stored keys
        with a sound header); a block whose later part cannot be read ends the list there for
        the parts that follow. Each block is checksummed as its parts go by: after the last
        part a block that fails is deleted and counted corrupt (a plain miss if the evictor
        removed it meanwhile). Parts are not verified on their own: the reader checks the
        checksum of the assembled payload too. ValueError when a cut is not inside a block's
        payload."""
        if not cuts or any(b <= a for a, b in zip(cuts, cuts[1:])) or cuts[0] <= 0:
            raise ValueError("part cuts must be positive and increasing")
        fds: dict[int, int] = {}
        n = 0
        try:
            blocks: list[tuple[BlockHash, Where, int, bytes | None]] = []
            first: list[bytes] = []
            hashes: list[xxhash.xxh3_64] = []
            for key in keys:
                if (where := self.catalog.where(key)) is None:
                    break
                seg, off, size = where
                try:
                    whole = self._read(key, where, fds) if seg < 0 else None
                    try:
                        head = (whole[:HEADER_SIZE + cuts[0]] if whole is not None else
                                self.segments.read(seg, off, HEADER_SIZE + cuts[0], fds))
                    except FileNotFoundError as e:
                        raise CorruptBlock("segment file missing") from e
                    except OSError as e:
                        raise CorruptBlock(f"unreadable: {e}") from e
                    h = check_header(key, head, size)
                except CorruptBlock as e:
                    self._corrupt(key, where, e)
                    break
                if cuts[-1] >= h.payload_len:
                    raise ValueError(f"part cut {cuts[-1]} is not inside a payload of "
                                     f"{h.payload_len} bytes")
                if len(head) != HEADER_SIZE + cuts[0]:
                    self._corrupt(key, where, CorruptBlock("segment cut short"))
                    break
                blocks.append((key, where, h.checksum, whole))
                hashes.append(xxhash.xxh3_64(memoryview(head)[HEADER_SIZE:]))
                first.append(head)
            n = len(blocks)
            if not n:
                return
            yield first
            ends: list[int | None] = [*cuts, None]
            for p in range(1, len(ends)):
                part: list[bytes] = []
                for i in range(n):
                    key, (seg, off, size), _, whole = blocks[i]
                    start = HEADER_SIZE + cuts[p - 1]
                    cut = ends[p]
                    end = size if cut is None else HEADER_SIZE + cut
                    try:
                        value = (whole[start:end] if whole is not None else
                                 self.segments.read(seg, off + start, end - start, fds))
                    except OSError:
                        value = b""
                    if len(value) != end - start:
                        self._corrupt(key, (seg, off, size), CorruptBlock("segment cut short"))
                        n = i  # this block and those after it end here
                        break
                    hashes[i].update(value)
                    part.append(value)
                if part:
                    yield part
                if not n:
                    return
            for i in range(n):
                if hashes[i].intdigest() != blocks[i][2]:
                    self._corrupt(blocks[i][0], blocks[i][1], CorruptBlock(CHECKSUM_MISMATCH))
                    n = i
                    break
        finally:
            self.segments.close_all(fds)
            self.catalog.count_read(keys, n)

    def _corrupt(self, key: BlockHash, where: Where, e: CorruptBlock) -> None:
        """A block failed its checks: a plain miss if it was evicted or rewritten meanwhile,
        otherwise deleted and counted."""
        if self.catalog.where(key) != where:
            return
        log.warning("corrupt block deleted", extra={"key": key.hex()[:16], "why": str(e)})
        self._drop([key])
        self.catalog.count("corrupt")

    def _fetch(self, keys: Sequence[BlockHash], read: ReadOne) -> int:
        """Calls `read` for the leading stored keys until one is missing, corrupt, or `read`
        says stop; deletes and counts a corrupt block; returns how many were read."""
        n = 0
        fds: dict[int, int] = {}
        try:
            for key in keys:
                if (where := self.catalog.where(key)) is None:
                    break
                try:
                    if not read(key, where, fds):
                        break
                except CorruptBlock as e:
                    self._corrupt(key, where, e)
                    break
                n += 1
        finally:
            self.segments.close_all(fds)
        self.catalog.count_read(keys, n)
        return n

    def _read_into(self, key: BlockHash, where: Where, fds: dict[int, int],
                   dest: memoryview, verify: bool = True) -> None:
        seg, off, size = where
        if seg < 0:
            value = self._read(key, where, fds)
            verify_block(key, value)
            dest[:] = value
            return
        h = xxhash.xxh3_64()
        header = None
        pos = 0
        try:
            while pos < size:
                n = min(READ_CHUNK, size - pos)
                got = self.segments.read_into(seg, off + pos, dest[pos:pos + n], fds)
                if got != n:
                    raise CorruptBlock(f"segment holds {pos + got} of the block's {size} bytes")
                if header is None:
                    header = check_header(key, dest[:n], size)
                    if verify:
                        h.update(dest[HEADER_SIZE:n])
                elif verify:
                    h.update(dest[pos:pos + n])
                pos += n
        except FileNotFoundError as e:
            raise CorruptBlock("segment file missing") from e
        except OSError as e:
            raise CorruptBlock(f"unreadable: {e}") from e
        if header is None or (verify and h.intdigest() != header.checksum):
            raise CorruptBlock(CHECKSUM_MISMATCH)

    def read(self, key: BlockHash, where: Where, fds: dict[int, int]) -> bytes:
        """One block's stored bytes, unverified (CorruptBlock when they cannot be had)."""
        return self._read(key, where, fds)

    def _read(self, key: BlockHash, where: Where, fds: dict[int, int]) -> bytes:
        seg, off, size = where
        try:
            if seg < 0:  # an old store's block, still in the `blocks` column family
                value = self.catalog.old_value(key)
                if value is None:
                    raise CorruptBlock("metadata without block")
                return value
            value = self.segments.read(seg, off, size, fds)
        except FileNotFoundError as e:
            raise CorruptBlock("segment file missing") from e
        except CorruptBlock:
            raise
        except Exception as e:
            raise CorruptBlock(f"unreadable: {e}") from e
        if len(value) != size:
            raise CorruptBlock(f"segment holds {len(value)} of the block's {size} bytes")
        return value
