"""Client of the kvstore service, sharded by rendezvous hashing.

Each block key goes to the shard with the highest xxh64(shard name || key): adding a shard to N
moves about 1/(N+1) of the keys, and nothing else. Every failure is a miss: a shard that is down
or slow never fails a request, it only costs recompute of the blocks it holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import grpc
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.cache.block_hash import BlockHash
from pdserve.services.server import channel
from pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc

log = logging.getLogger(__name__)


def rendezvous(key: BlockHash, shards: Sequence[str]) -> int:
    """Index of the shard that owns `key` (highest random weight)."""
    best, arg = -1, 0
    for i, name in enumerate(shards):
        w = xxhash.xxh64_intdigest(name.encode() + b"\0" + key)
        if w > best:
            best, arg = w, i
    return arg


class StoreBlock(NamedTuple):
    """A block to store: its key, its encoded bytes (cache/codec.py), its depth in the chain."""

    key: BlockHash
    value: bytes
    depth: int


@dataclass
class LookupResult:
    prefix: int | None            # leading stored blocks; None = no shard answered
    first_miss_evicted: bool = False


@dataclass
class _Shard:
    address: str
    channel: grpc.aio.Channel
    stub: kvstore_pb2_grpc.KVStoreAsyncStub


class KVStoreClient:
    def __init__(self, addresses: str | Sequence[str], timeout_s: float) -> None:
        if isinstance(addresses, str):
            addresses = [a.strip() for a in addresses.split(",") if a.strip()]
        self.timeout_s = timeout_s
        self.shards: list[_Shard] = []
        for a in addresses:
            ch = channel(a)
            self.shards.append(_Shard(a, ch, kvstore_pb2_grpc.KVStoreStub(ch)))
        self._names = [s.address for s in self.shards]

    @property
    def enabled(self) -> bool:
        return bool(self.shards)

    @property
    def shard_names(self) -> list[str]:
        """The shards' addresses, in the order rendezvous hashing numbers them."""
        return list(self._names)

    def group(self, keys: Sequence[BlockHash]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(rendezvous(k, self._names) if len(self.shards) > 1 else 0,
                              []).append(i)
        return groups

    async def lookup(self, keys: Sequence[BlockHash]) -> int | None:
        """Leading stored blocks, or None when no shard could answer."""
        return (await self.lookup_detail(keys)).prefix

    async def lookup_detail(self, keys: Sequence[BlockHash]) -> LookupResult:
        """Leading stored blocks (None when no shard could answer), and whether the first
        missing block was evicted or expired (rather than never stored)."""
        if not self.shards:
            return LookupResult(None)
        if not keys:
            return LookupResult(0)
        groups = self.group(keys)
        present = [False] * len(keys)
        evicted = [False] * len(keys)

        async def ask(shard: int, idx: list[int]) -> bool:
            try:
                r = await self.shards[shard].stub.Lookup(
                    kvstore_pb2.LookupRequest(keys=[keys[i] for i in idx], per_key=True),
                    timeout=self.timeout_s)
            except grpc.aio.AioRpcError as e:
                log.warning("kvstore lookup failed", extra={"shard": self._names[shard],
                                                            "code": e.code().name})
                return False
            for i, p in zip(idx, r.present):
                present[i] = p
            for i, ev in zip(idx, r.evicted):
                evicted[i] = ev
            return True

        answered = await asyncio.gather(*(ask(s, idx) for s, idx in groups.items()))
        if not any(answered):
            return LookupResult(None)
        n = next((i for i, p in enumerate(present) if not p), len(keys))
        return LookupResult(n, n < len(keys) and evicted[n])

    async def get(self, keys: Sequence[BlockHash]) -> list[bytes]:
        """Blocks for the leading keys that could be fetched (possibly fewer, possibly none)."""
        if not self.shards or not keys:
            return []
        values: list[bytes | None] = [None] * len(keys)

        async def fetch(shard: int, idx: list[int]) -> None:
            got = 0
            try:
                call = self.shards[shard].stub.Get(
                    kvstore_pb2.GetRequest(keys=[keys[i] for i in idx]),
                    timeout=self.timeout_s + 0.05 * len(idx))
                async for block in call:
                    i = idx[got]
                    if block.key != keys[i]:
                        break
                    values[i] = block.value
                    got += 1
            except grpc.aio.AioRpcError as e:
                log.warning("kvstore get failed", extra={"shard": self._names[shard],
                                                         "code": e.code().name, "got": got})

        await asyncio.gather(*(fetch(s, idx) for s, idx in self.group(keys).items()))
        out: list[bytes] = []
        for v in values:
            if v is None:
                break
            out.append(v)
        return out

    async def get_parts_from(self, shard: int, keys: Sequence[BlockHash], cuts: Sequence[int],
                             on_part: Callable[[int, int, bytes], None]) -> None:
        """Streams one shard's blocks in parts (kvstore.proto, GetRequest.part_cuts): calls
        on_part(key index, part, value) as each arrives, parts of a block in order. A block
        that could not be fetched gets fewer parts, or none: the caller checks that every
        block it needs is complete, and verifies it (services/layer_fetch.py)."""
        want = [0] * len(keys)  # next part expected, per block
        part, pos = 0, 0        # the part being streamed; the block expected next
        try:
            call = self.shards[shard].stub.Get(
                kvstore_pb2.GetRequest(keys=keys, part_cuts=cuts),
                timeout=self.timeout_s + 0.05 * len(keys))
            async for block in call:
                if block.part == part + 1:  # the next part starts again from the first block
                    part, pos = part + 1, 0
                if (block.part != part or pos >= len(keys) or block.key != keys[pos]
                        or want[pos] != part):
                    log.warning("kvstore get: parts out of order",
                                extra={"shard": self._names[shard]})
                    return
                on_part(pos, block.part, block.value)
                want[pos] += 1
                pos += 1
        except grpc.aio.AioRpcError as e:
            log.warning("kvstore get failed", extra={"shard": self._names[shard],
                                                     "code": e.code().name})

    async def stage(self, shard: int,
                    keys: Sequence[BlockHash]) -> kvstore_pb2.StageResponse | None:
        """Asks one shard to stage the keys' leading blocks for a NIXL READ; None when it
        cannot (no staging buffer, full, unreachable)."""
        try:
            return await self.shards[shard].stub.Stage(kvstore_pb2.StageRequest(keys=keys),
                                                       timeout=self.timeout_s + 0.01 * len(keys))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                log.warning("kvstore stage failed", extra={"shard": self._names[shard],
                                                           "code": e.code().name})
            return None

    async def put(self, blocks: Sequence[StoreBlock]) -> int:
        """Stores the blocks; returns how many were new."""
        if not self.shards or not blocks:
            return 0

        async def send(shard: int, idx: list[int]) -> int:
            async def gen() -> AsyncIterator[kvstore_pb2.Block]:
                for i in idx:
                    k, v, d = blocks[i]
                    yield kvstore_pb2.Block(key=k, value=v, depth=d)

            try:
                r = await self.shards[shard].stub.Put(gen(),
                                                      timeout=self.timeout_s + 0.05 * len(idx))
                return r.stored
            except grpc.aio.AioRpcError as e:
                log.warning("kvstore put failed", extra={"shard": self._names[shard],
                                                         "code": e.code().name})
                return 0

        groups = self.group([b.key for b in blocks])
        return sum(await asyncio.gather(*(send(s, idx) for s, idx in groups.items())))

    async def ready(self) -> bool:
        """True when at least one shard reports SERVING."""
        for s in self.shards:
            try:
                r = await health_pb2_grpc.HealthStub(s.channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=self.timeout_s)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.aio.AioRpcError:
                continue
        return False

    async def close(self) -> None:
        for s in self.shards:
            await s.channel.close(None)
