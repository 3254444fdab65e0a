"""The kvstore service: the RocksDB block store behind gRPC.

Lifecycle of a block:
1. A prefill worker computes a full block that the store lacks and `Put`s it (best effort,
   after its request's KV transfer, off the request path).
2. The gateway `Lookup`s a prompt's hash chain to learn how many leading blocks are stored.
3. A prefill worker `Get`s those blocks and loads them instead of computing them.
4. Every read is verified; a corrupt block is deleted and served as a miss.

Startup: open RocksDB under --data-dir/kvstore (a second start finds the same blocks), serve,
write the ready file. Shutdown: NOT_SERVING, drain RPCs, close the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from pdserve.cache.codec import verify_block
from pdserve.cache.errors import CorruptBlock
from pdserve.cache.store import BlockStore
from pdserve.config import KVStoreSettings
from pdserve.services.server import SERVING, create_server, serve_until_signal, write_ready_file
from pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc

log = logging.getLogger(__name__)

MAX_KEYS = 65536
KEY_BYTES = 32


def _check_keys(keys, context: grpc.aio.ServicerContext | None = None) -> str | None:
    if len(keys) > MAX_KEYS:
        return f"keys: {len(keys)} keys, limit {MAX_KEYS}"
    for i, k in enumerate(keys):
        if len(k) != KEY_BYTES:
            return f"keys[{i}]: {len(k)} bytes, keys are {KEY_BYTES}-byte block hashes"
    return None


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, store: BlockStore) -> None:
        self.store = store

    async def Lookup(self, request, context):
        if (err := _check_keys(request.keys)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)
        n = await asyncio.to_thread(self.store.lookup, list(request.keys))
        return kvstore_pb2.LookupResponse(num_prefix=n)

    async def Get(self, request, context) -> AsyncIterator[kvstore_pb2.Block]:
        if (err := _check_keys(request.keys)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)
        keys = list(request.keys)
        # Read in small groups so a long chain streams while later blocks are still read.
        for i in range(0, len(keys), 8):
            group = keys[i:i + 8]
            values = await asyncio.to_thread(self.store.get_many, group)
            for k, v in zip(group, values):
                yield kvstore_pb2.Block(key=k, value=v)
            if len(values) < len(group):
                return

    async def Put(self, request_iterator, context):
        items: list[tuple[bytes, bytes]] = []
        size = 0
        stored = 0
        async for block in request_iterator:
            if len(block.key) != KEY_BYTES:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"key: {len(block.key)} bytes, keys are {KEY_BYTES} bytes")
            try:
                verify_block(block.key, block.value)
            except CorruptBlock as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"value: {e}")
            items.append((block.key, block.value))
            size += len(block.value)
            if size >= 64 << 20:  # write in batches of ~64 MiB
                stored += await asyncio.to_thread(self.store.put_many, items)
                items, size = [], 0
        if items:
            stored += await asyncio.to_thread(self.store.put_many, items)
        return kvstore_pb2.PutResponse(stored=stored)

    async def Stats(self, request, context):
        s = self.store.stats
        return kvstore_pb2.StatsResponse(num_blocks=s.num_blocks, num_bytes=s.num_bytes,
                                         hits=s.hits, misses=s.misses, puts=s.puts,
                                         corrupt=s.corrupt)


async def run(settings: KVStoreSettings) -> None:
    store = BlockStore(settings.data_dir / "kvstore", sync=settings.sync)
    servicer = KVStoreServicer(store)
    server, port, health = await create_server(
        [lambda s: kvstore_pb2_grpc.add_KVStoreServicer_to_server(servicer, s)],
        [kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name],
        settings.host, settings.port,
    )
    await health.set("", SERVING)
    await health.set("pdserve.v1.KVStore", SERVING)
    write_ready_file(settings.ready_file, port)
    log.info("kvstore serving", extra={"port": port, "blocks": store.stats.num_blocks})

    async def cleanup() -> None:
        store.close()

    await serve_until_signal(server, health, cleanup)
