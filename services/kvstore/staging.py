"""The kvstore's NIXL staging: bulk block reads by one-sided NIXL READ.

A prefill worker calls `Stage(keys)`; the store finds the leading stored blocks in their
segment files (`BlockStore.locate`, headers checked), maps those files read-only and registers
the mappings with its agent, and answers each block's header and the address of its payload in
the mapping, with the NIXL partial metadata of those mappings (registered after the reader
took the agent's metadata). The prefill READs the payloads straight from the page cache into
its KV pages — in layer groups, as the gRPC part stream does — checks them against the
headers' checksums, and notifies the store's agent with a `StageRelease`. Mappings are kept
for later stages (least recently used out past MAX_MAPPED_SEGMENTS; a file deleted, or grown
past its mapping, is mapped anew), each closed once no lease holds blocks in it. Each file is
mapped at the segment size, so the segment being written grows into its mapping and new
blocks need no new region. Answers carry the count of mappings closed so far: a closed
mapping's addresses can be mapped again, and a reader that kept the old region would not find
the new one (services/transfer.py, `load_regions`). A block deleted while READ reads as the
zeros punched over it and fails the reader's checksum.

Without in-place staging (`map_segments=False`, or files that cannot be mapped or registered)
the store copies the blocks into a region of one registered buffer (`BlockStore.get_into`: one
copy from the page cache) and answers addresses there; the region is free once released. A
reader that never releases loses its lease (and region) when the lease ends.

Payloads are checked once, end to end, by the reader (the store checking them too cost a
second pass over every byte on the way to a first token); the release names any block whose
payload did not match, and the store then verifies that block (`get_many`, which deletes and
counts a corrupt one), so a bad block is not served again.

The store's agent must make progress for remote READs to complete (NIXL runs without a progress
thread here, which would spin a core), so `poll` runs while any region is leased, reading
notifications every half millisecond, and sleeps otherwise. A notification is parsed as a
protobuf message, never unpickled.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import mmap
import os
import time
from bisect import insort
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from pdserve.cache.block_hash import BlockHash
from pdserve.cache.codec import HEADER_SIZE
from pdserve.cache.memory import AnonymousBuffer
from pdserve.cache.store import BlockStore
from pdserve.services.nixl_agent import new_agent
from pdserve.v1 import kvstore_pb2

log = logging.getLogger(__name__)

MAX_MAPPED_SEGMENTS = 256  # segment files kept mapped (64 MB each by default), least recent out


class Extents:
    """First-fit allocator of byte ranges of one buffer; freed neighbours merge."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (start, length), by start

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._free)

    def largest(self) -> int:
        return max((n for _, n in self._free), default=0)

    def alloc(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (start + n, length - n)
                return start
        return None

    def free(self, start: int, n: int) -> None:
        insort(self._free, (start, n))
        merged: list[tuple[int, int]] = []
        for s, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        self._free = merged


class _Mapping:
    """One segment file mapped read-only and registered with the agent: its blocks are READ
    where they lie, in the page cache.

    The mapping is `capacity` bytes (the store's segment size), or the file's size if larger,
    whatever the file holds yet: the segment being written grows into it, and its new blocks
    need no new mapping (pages past the end of the file are never read: only blocks the store
    located are staged, and a segment is never cut below a located block; a READ there would
    fault: the reader's over shared memory, the store's over TCP). Each new mapping is a new
    region for every reader to load, and each closed one makes readers forget all of the
    store's regions (`StagingArea.closed`)."""

    def __init__(self, agent: Any, path: Path, capacity: int) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            self.length = -(-max(capacity, size, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
            self.addr = _mmap(self.length, self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self.agent = agent
        try:
            descs = agent.get_reg_descs([(self.addr, self.length, 0, "")], "DRAM")
            self.reg = agent.register_memory(descs)
            self.metadata: bytes = agent.get_partial_agent_metadata(descs, False)  # readers'
        except BaseException:
            _munmap(self.addr, self.length)
            os.close(self.fd)
            raise
        self.leases = 0      # leases whose blocks lie here
        self.retired = False  # no new leases; closed once `leases` is 0

    def current(self, end: int) -> bool:
        """Holds bytes [0, end) of a segment file still linked (not deleted)."""
        return not self.retired and end <= self.length and os.fstat(self.fd).st_nlink > 0

    def close(self) -> None:
        try:
            self.agent.deregister_memory(self.reg)
        except Exception:  # noqa: BLE001 - shutting down, or the agent is gone
            pass
        _munmap(self.addr, self.length)
        os.close(self.fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(length: int, fd: int) -> int:
    """A shared read-only mapping of `length` bytes of a file, which may reach past its end
    (Python's mmap refuses that)."""
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes: {os.strerror(err)}")
    return int(addr)


def _munmap(addr: int, length: int) -> None:
    _libc.munmap(addr, length)


@dataclass
class _Lease:
    start: int           # staging buffer region; -1: blocks READ in place (mappings)
    size: int
    expires: float
    store: BlockStore
    keys: list[BlockHash]
    maps: list[_Mapping] = field(default_factory=list)


class StagingArea:
    def __init__(self, name: str, nbytes: int, lease_s: float = 10.0,
                 map_segments: bool = True) -> None:
        self.name = name
        self.lease_s = lease_s
        self.map_segments = map_segments
        self._maps: OrderedDict[tuple[int, int], _Mapping] = OrderedDict()  # (store, segment)
        self._retired: list[_Mapping] = []
        self.mapped_blocks = 0  # blocks staged in place (their segment files mapped)
        self.closed = 0  # mappings closed (their address ranges free to be mapped again)
        self.memory = AnonymousBuffer(nbytes)  # first-fit reuse keeps its low end warm
        self._view = memoryview(self.memory.mmap)
        self.base = self.memory.addr
        self.extents = Extents(nbytes)
        self.agent = new_agent(name)
        self._reg = self.agent.register_memory(
            self.agent.get_reg_descs([(self.base, nbytes, 0, "")], "DRAM"))
        self.metadata = self.agent.get_agent_metadata()
        self._leases: dict[int, _Lease] = {}
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self.released = 0
        self.expired = 0
        self.staged_blocks = 0
        self.mismatched = 0  # staged blocks a reader found not matching their checksum
        self._suspects: list[tuple[BlockStore, BlockHash]] = []

    @property
    def leased(self) -> int:
        return len(self._leases)

    @property
    def mapped_segments(self) -> int:
        return len(self._maps) + len(self._retired)

    async def stage(self, store: BlockStore, keys: Sequence[BlockHash]
                    ) -> kvstore_pb2.StageResponse:
        """Stages the leading stored blocks: in place, their segment files mapped, or else
        copied into one free region of the buffer, those that fit (possibly none). Event loop
        only (the allocator and the mappings are not locked); file reads run in a thread."""
        if self.map_segments:
            located = await asyncio.to_thread(store.locate, keys)
            if located:
                try:
                    return self._in_place(store, keys, located)
                except (OSError, ValueError) as e:  # a file deleted or cut meanwhile: copied,
                    log.info("segment not mapped; staging by copy",  # this time
                             extra={"error": f"{type(e).__name__}: {e}"})
                except Exception as e:  # noqa: BLE001 - NIXL raises its own types
                    log.warning("segment files cannot be mapped and registered; staging by copy",
                                extra={"error": f"{type(e).__name__}: {e}"})
                    self.map_segments = False
        sizes = store.sizes(keys)
        room, total, n = self.extents.largest(), 0, 0
        while n < len(sizes) and total + sizes[n] <= room:
            total += sizes[n]
            n += 1
        if n == 0:
            return kvstore_pb2.StageResponse(agent_name=self.name, agent_metadata=self.metadata)
        start = self.extents.alloc(total)
        assert start is not None
        try:
            lengths = await asyncio.to_thread(store.get_into, keys[:n],
                                              self._view[start:start + total], False)
        except BaseException:
            self.extents.free(start, total)
            raise
        used = sum(lengths)
        if used < total:
            self.extents.free(start + used, total - used)
        resp = kvstore_pb2.StageResponse(agent_name=self.name, agent_metadata=self.metadata,
                                         lease_s=self.lease_s, mem_type="DRAM")
        if not used:
            return resp
        stage_id = next(self._ids)
        self._leases[stage_id] = _Lease(start, used, time.monotonic() + self.lease_s, store,
                                        list(keys[:len(lengths)]))
        self._wake.set()
        pos = start
        for size in lengths:
            resp.blocks.append(kvstore_pb2.StagedBlock(
                header=bytes(self._view[pos:pos + HEADER_SIZE]), addr=self.base + pos + HEADER_SIZE,
                length=size - HEADER_SIZE))
            pos += size
        resp.stage_id = stage_id
        self.staged_blocks += len(lengths)
        return resp

    def _in_place(self, store: BlockStore, keys: Sequence[BlockHash],
                  located: list[tuple[tuple[int, int, int], bytes]]
                  ) -> kvstore_pb2.StageResponse:
        """A lease on blocks READ where they lie: each one's segment file mapped (kept mapped
        for later stages), its payload's address in the mapping."""
        resp = kvstore_pb2.StageResponse(agent_name=self.name, agent_metadata=self.metadata,
                                         lease_s=self.lease_s, mem_type="DRAM")
        lease = _Lease(-1, 0, time.monotonic() + self.lease_s, store,
                       list(keys[:len(located)]))
        ends: dict[int, int] = {}
        for (seg, off, size), _ in located:
            ends[seg] = max(ends.get(seg, 0), off + size)
        maps = {seg: self._mapping(store, seg, end) for seg, end in ends.items()}
        for (seg, off, size), header in located:
            resp.blocks.append(kvstore_pb2.StagedBlock(
                header=header, addr=maps[seg].addr + off + HEADER_SIZE,
                length=size - HEADER_SIZE))
        lease.maps = list(maps.values())
        for m in lease.maps:
            m.leases += 1
        resp.region_metadata.extend(m.metadata for m in lease.maps)
        resp.regions_closed = self.closed
        resp.stage_id = stage_id = next(self._ids)
        self._leases[stage_id] = lease
        self._wake.set()
        self.mapped_blocks += len(located)
        return resp

    def _mapping(self, store: BlockStore, seg: int, end: int) -> _Mapping:
        """The mapping of a segment file that holds bytes [0, end): the one kept, or a new
        one (a segment that grew since, or one deleted and written anew, is mapped again)."""
        key = (id(store), seg)
        m = self._maps.get(key)
        if m is not None and m.current(end):
            self._maps.move_to_end(key)
            return m
        if m is not None:
            self._retire(self._maps.pop(key))
        m = self._maps[key] = _Mapping(self.agent, store.segment_path(seg),
                                       store.segments.segment_bytes)
        if m.length < end:
            raise OSError(f"segment {seg} holds {m.length} bytes, a block ends at {end}")
        while len(self._maps) > MAX_MAPPED_SEGMENTS:
            self._retire(self._maps.popitem(last=False)[1])
        return m

    def _retire(self, m: _Mapping) -> None:
        m.retired = True
        if m.leases:
            self._retired.append(m)  # closed when its last lease ends
        else:
            self._close(m)

    def _close(self, m: _Mapping) -> None:
        m.close()
        self.closed += 1

    def release(self, stage_id: int, mismatched: Sequence[int] = ()) -> bool:
        """Frees a staged region; `mismatched` (indexes of its blocks) are verified later."""
        lease = self._leases.pop(stage_id, None)
        if lease is None:
            return False
        if lease.start >= 0:
            self.extents.free(lease.start, lease.size)
        for m in lease.maps:
            m.leases -= 1
            if m.retired and not m.leases:
                self._retired.remove(m)
                self._close(m)
        for i in mismatched:
            if i < len(lease.keys):
                self.mismatched += 1
                self._suspects.append((lease.store, lease.keys[i]))
        return True

    def verify_suspects(self) -> int:
        """Verifies the blocks readers reported (a corrupt one is deleted and counted by the
        store); returns how many were looked at. Off the event loop: it reads whole blocks."""
        suspects, self._suspects = self._suspects, []
        for store, key in suspects:
            store.get_many([key])
        if suspects:
            log.warning("staged blocks reported mismatched; verified",
                        extra={"blocks": len(suspects)})
        return len(suspects)

    def poll_once(self) -> None:
        for _agent, msgs in self.agent.get_new_notifs().items():
            for raw in msgs:
                msg = kvstore_pb2.StageRelease()
                try:
                    msg.ParseFromString(bytes(raw))
                except DecodeError:
                    log.warning("malformed staging notification dropped", extra={"bytes": len(raw)})
                    continue
                if self.release(msg.stage_id, msg.mismatched):
                    self.released += 1
        now = time.monotonic()
        for stage_id in [s for s, lease in self._leases.items() if lease.expires < now]:
            self.release(stage_id)
            self.expired += 1
            log.warning("staged blocks never released; lease ended", extra={"stage": stage_id})

    async def poll(self) -> None:
        """Progresses the agent (remote READs) and handles releases while anything is staged."""
        while True:
            if not self._leases:
                self._wake.clear()
                await self._wake.wait()
            self.poll_once()
            if self._suspects:
                await asyncio.to_thread(self.verify_suspects)
            await asyncio.sleep(0.0005)

    def close(self) -> None:
        for m in [*self._maps.values(), *self._retired]:
            m.close()
        self._maps.clear()
        self._retired.clear()
        try:
            self.agent.deregister_memory(self._reg)
        except Exception:  # noqa: BLE001 - shutting down
            pass
