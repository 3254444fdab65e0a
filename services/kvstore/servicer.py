"""The kvstore service's gRPC methods: validate, convert, delegate to the block store; errors
become statuses in services/errors.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from pdserve.cache.block_hash import BlockHash
from pdserve.cache.codec import verify_block
from pdserve.cache.errors import CorruptBlock, StoreFull
from pdserve.cache.store import BlockStore
from pdserve.services.errors import (
    InvalidArgument,
    ResourceExhausted,
    Unimplemented,
    answers_errors,
)
from pdserve.services.kvstore.staging import StagingArea
from pdserve.services.limits import KEY_BYTES, MAX_KEYS, MAX_PARTS, PUT_BATCH_BYTES
from pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc

if TYPE_CHECKING:
    from pdserve.services.server import Context

GET_GROUP = 8  # a long chain streams while its later blocks are still being read


def check_keys(keys: Sequence[bytes]) -> list[BlockHash]:
    if len(keys) > MAX_KEYS:
        raise InvalidArgument(f"keys: {len(keys)} keys, limit {MAX_KEYS}")
    for i, k in enumerate(keys):
        if len(k) != KEY_BYTES:
            raise InvalidArgument(f"keys[{i}]: {len(k)} bytes, keys are {KEY_BYTES}-byte "
                                  f"block hashes")
    return [BlockHash(k) for k in keys]


def check_cuts(cuts: Sequence[int]) -> list[int]:
    if len(cuts) > MAX_PARTS - 1:
        raise InvalidArgument(f"part_cuts: {len(cuts)} cuts, limit {MAX_PARTS - 1}")
    if cuts[0] <= 0 or any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise InvalidArgument("part_cuts: must be positive and increasing")
    return list(cuts)


async def _no_publish(accepting: bool) -> None:
    return None


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, store: BlockStore, staging: StagingArea | None = None,
                 on_write_state: Callable[[bool], Awaitable[None]] = _no_publish) -> None:
        self.store = store
        self.staging = staging
        self.on_write_state = on_write_state  # publishes write health (main.py)

    @answers_errors
    async def Lookup(self, request: kvstore_pb2.LookupRequest,
                     context: Context) -> kvstore_pb2.LookupResponse:
        keys = check_keys(request.keys)
        if request.per_key:
            present = self.store.present(keys)
            n = next((i for i, p in enumerate(present) if not p), len(keys))
            return kvstore_pb2.LookupResponse(num_prefix=n, present=present,
                                              evicted=self.store.was_removed(keys))
        return kvstore_pb2.LookupResponse(num_prefix=self.store.lookup(keys))

    @answers_errors
    async def Get(self, request: kvstore_pb2.GetRequest,
                  context: Context) -> AsyncIterator[kvstore_pb2.Block]:
        keys = check_keys(request.keys)
        if request.part_cuts:
            async for block in self._get_parts(keys, check_cuts(request.part_cuts)):
                yield block
            return
        for i in range(0, len(keys), GET_GROUP):
            group = keys[i:i + GET_GROUP]
            values = await asyncio.to_thread(self.store.get_many, group)
            for k, v in zip(group, values):
                yield kvstore_pb2.Block(key=k, value=v)
            if len(values) < len(group):
                return

    async def _get_parts(self, keys: list[BlockHash], cuts: list[int]
                         ) -> AsyncIterator[kvstore_pb2.Block]:
        parts = self.store.get_parts(keys, cuts)
        try:
            for p in range(len(cuts) + 1):
                try:
                    values = await asyncio.to_thread(next, parts, None)
                except ValueError as e:
                    raise InvalidArgument(f"part_cuts: {e}") from None
                if values is None:
                    return
                for k, v in zip(keys, values):
                    yield kvstore_pb2.Block(key=k, value=v, part=p)
            await asyncio.to_thread(next, parts, None)  # the last blocks' checksums
        finally:
            await asyncio.to_thread(parts.close)

    @answers_errors
    async def Stage(self, request: kvstore_pb2.StageRequest,
                    context: Context) -> kvstore_pb2.StageResponse:
        if self.staging is None:
            raise Unimplemented("kvstore: no NIXL staging buffer (--nixl-staging-mb 0)")
        keys = check_keys(request.keys)
        resp = await self.staging.stage(self.store, keys)
        if not resp.blocks and self.store.lookup(keys[:1]):
            raise ResourceExhausted("kvstore: NIXL staging buffer full; use Get")
        return resp

    @answers_errors
    async def Put(self, request_iterator: AsyncIterator[kvstore_pb2.Block],
                  context: Context) -> kvstore_pb2.PutResponse:
        if not self.store.accepting_writes:
            raise ResourceExhausted("kvstore: not accepting writes (disk full); reads go on")
        items: list[tuple[BlockHash, bytes]] = []
        depths: list[int] = []
        size = stored = 0
        async for block in request_iterator:
            if len(block.key) != KEY_BYTES:
                raise InvalidArgument(f"key: {len(block.key)} bytes, keys are {KEY_BYTES} bytes")
            key = BlockHash(block.key)
            try:
                verify_block(key, block.value)
            except CorruptBlock as e:
                raise InvalidArgument(f"value: {e}") from None
            items.append((key, block.value))
            depths.append(block.depth)
            size += len(block.value)
            if size >= PUT_BATCH_BYTES:
                stored += await self._put(items, depths)
                items, depths, size = [], [], 0
        if items:
            stored += await self._put(items, depths)
        return kvstore_pb2.PutResponse(stored=stored)

    async def _put(self, items: list[tuple[BlockHash, bytes]], depths: list[int]) -> int:
        try:
            return await asyncio.to_thread(self.store.put_many, items, depths)
        except StoreFull:
            await self.on_write_state(False)
            raise

    @answers_errors
    async def Stats(self, request: kvstore_pb2.StatsRequest,
                    context: Context) -> kvstore_pb2.StatsResponse:
        s = self.store.stats
        return kvstore_pb2.StatsResponse(
            num_blocks=s.num_blocks, num_bytes=s.num_bytes, hits=s.hits, misses=s.misses,
            puts=s.puts, corrupt=s.corrupt, evicted=s.evicted, expired=s.expired,
            write_errors=s.write_errors, accepting_writes=self.store.accepting_writes,
            capacity_bytes=self.store.capacity_bytes)
