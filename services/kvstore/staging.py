"""The kvstore's NIXL staging buffer: bulk block reads by one-sided NIXL READ.

A prefill worker calls `Stage(keys)`; the store reads the leading stored blocks into a region
of one registered buffer (`BlockStore.get_into`: one copy from the page cache, headers checked)
and answers each block's header and the address of its payload. The prefill READs the payloads
straight into its KV pages — in layer groups, as the gRPC part stream does — checks them
against the headers' checksums, and notifies the store's agent with a `StageRelease`; the
region is then free. A reader that never releases loses its region when the lease ends.

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
import itertools
import logging
import time
from bisect import insort
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from pdserve.cache.block_hash import BlockHash
from pdserve.cache.codec import HEADER_SIZE
from pdserve.cache.memory import AnonymousBuffer
from pdserve.cache.store import BlockStore
from pdserve.services.nixl_agent import new_agent
from pdserve.v1 import kvstore_pb2

log = logging.getLogger(__name__)


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


@dataclass
class _Lease:
    start: int
    size: int
    expires: float
    store: BlockStore
    keys: list[BlockHash]


class StagingArea:
    def __init__(self, name: str, nbytes: int, lease_s: float = 10.0) -> None:
        self.name = name
        self.lease_s = lease_s
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

    async def stage(self, store: BlockStore, keys: Sequence[BlockHash]
                    ) -> kvstore_pb2.StageResponse:
        """Stages the leading stored blocks that fit in one free region (possibly none).
        Event loop only (the allocator is not locked); the read runs in a thread."""
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

    def release(self, stage_id: int, mismatched: Sequence[int] = ()) -> bool:
        """Frees a staged region; `mismatched` (indexes of its blocks) are verified later."""
        lease = self._leases.pop(stage_id, None)
        if lease is None:
            return False
        self.extents.free(lease.start, lease.size)
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
        try:
            self.agent.deregister_memory(self._reg)
        except Exception:  # noqa: BLE001 - shutting down
            pass
