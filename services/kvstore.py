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
import time
from collections.abc import AsyncIterator

import grpc
from pdserve.cache.codec import verify_block
from pdserve.cache.errors import CorruptBlock
from pdserve.cache.memory import keep_large_buffers_on_heap
from pdserve.cache.store import BlockStore, StoreFull
from pdserve.services import security
from pdserve.services.server import (
    NOT_SERVING,
    SERVING,
    create_server,
    serve_until_signal,
    write_ready_file,
)
from pdserve.services.staging import StagingArea
from pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc
from prometheus_client import CollectorRegistry

from pdserve.config import KVStoreSettings
from pdserve.metrics import StagingCollector, StoreCollector, serve_metrics

log = logging.getLogger(__name__)

MAX_KEYS = 65536
MAX_PARTS = 1024
KEY_BYTES = 32


def _check_keys(keys) -> str | None:  # type: ignore[no-untyped-def]
    if len(keys) > MAX_KEYS:
        return f"keys: {len(keys)} keys, limit {MAX_KEYS}"
    for i, k in enumerate(keys):
        if len(k) != KEY_BYTES:
            return f"keys[{i}]: {len(k)} bytes, keys are {KEY_BYTES}-byte block hashes"
    return None


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, store: BlockStore, staging: StagingArea | None = None) -> None:
        self.store = store
        self.staging = staging

    async def Lookup(self, request, context):
        if (err := _check_keys(request.keys)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)
        keys = list(request.keys)
        if request.per_key:
            present = self.store.present(keys)
            n = next((i for i, p in enumerate(present) if not p), len(keys))
            return kvstore_pb2.LookupResponse(num_prefix=n, present=present,
                                              evicted=self.store.was_removed(keys))
        return kvstore_pb2.LookupResponse(num_prefix=self.store.lookup(keys))

    async def Get(self, request, context) -> AsyncIterator[kvstore_pb2.Block]:
        if (err := _check_keys(request.keys)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)
        keys = list(request.keys)
        if request.part_cuts:
            async for block in self._get_parts(keys, list(request.part_cuts), context):
                yield block
            return
        # Read in small groups so a long chain streams while later blocks are still read.
        for i in range(0, len(keys), 8):
            group = keys[i:i + 8]
            values = await asyncio.to_thread(self.store.get_many, group)
            for k, v in zip(group, values):
                yield kvstore_pb2.Block(key=k, value=v)
            if len(values) < len(group):
                return

    async def _get_parts(self, keys: list[bytes], cuts: list[int],
                         context) -> AsyncIterator[kvstore_pb2.Block]:  # type: ignore[no-untyped-def]
        if len(cuts) > MAX_PARTS - 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"part_cuts: {len(cuts)} cuts, limit {MAX_PARTS - 1}")
        if cuts[0] <= 0 or any(b <= a for a, b in zip(cuts, cuts[1:])):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "part_cuts: must be positive and increasing")
        parts = self.store.get_parts(keys, cuts)
        try:
            for p in range(len(cuts) + 1):
                try:
                    values = await asyncio.to_thread(next, parts, None)
                except ValueError as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"part_cuts: {e}")
                if values is None:
                    return
                for k, v in zip(keys, values):
                    yield kvstore_pb2.Block(key=k, value=v, part=p)
            await asyncio.to_thread(next, parts, None)  # the last blocks' checksums
        finally:
            await asyncio.to_thread(parts.close)

    async def Stage(self, request, context):
        if self.staging is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                "kvstore: no NIXL staging buffer (--nixl-staging-mb 0)")
        if (err := _check_keys(request.keys)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)
        resp = await self.staging.stage(self.store, list(request.keys))
        if not resp.blocks and self.store.lookup(list(request.keys[:1])):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "kvstore: NIXL staging buffer full; use Get")
        return resp

    async def Put(self, request_iterator, context):
        if not self.store.accepting_writes:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "kvstore: not accepting writes (disk full); reads go on")
        items: list[tuple[bytes, bytes]] = []
        depths: list[int] = []
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
            depths.append(block.depth)
            size += len(block.value)
            if size >= 64 << 20:  # write in batches of ~64 MiB
                stored += await self._put(items, depths, context)
                items, depths, size = [], [], 0
        if items:
            stored += await self._put(items, depths, context)
        return kvstore_pb2.PutResponse(stored=stored)

    async def _put(self, items, depths, context) -> int:  # type: ignore[no-untyped-def]
        try:
            return await asyncio.to_thread(self.store.put_many, items, depths)
        except StoreFull as e:
            await self.on_write_state(False)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"kvstore: {e}")
            raise  # unreachable: abort raises

    async def on_write_state(self, accepting: bool) -> None:
        """Replaced at start-up to publish write health."""

    async def Stats(self, request, context):
        s = self.store.stats
        return kvstore_pb2.StatsResponse(
            num_blocks=s.num_blocks, num_bytes=s.num_bytes, hits=s.hits, misses=s.misses,
            puts=s.puts, corrupt=s.corrupt, evicted=s.evicted, expired=s.expired,
            write_errors=s.write_errors, accepting_writes=self.store.accepting_writes,
            capacity_bytes=self.store.capacity_bytes)


WRITE_HEALTH = "pdserve.v1.KVStore.Write"  # NOT_SERVING while puts are refused


def open_store(settings: KVStoreSettings, read_only: bool = False) -> BlockStore:
    return BlockStore(settings.data_dir / "kvstore", sync=settings.sync,
                      sync_interval_ms=settings.sync_interval_ms,
                      capacity_bytes=settings.capacity_bytes,
                      high_watermark=settings.high_watermark,
                      low_watermark=settings.low_watermark, max_age_s=settings.max_age_s,
                      read_only=read_only)


def open_staging(settings: KVStoreSettings) -> StagingArea | None:
    """The NIXL staging buffer, or None when it is off or cannot be had (no UCX transport,
    memory that cannot be registered): then blocks go through gRPC only, which is slower but
    loses nothing, so the store starts anyway and says why."""
    if not settings.nixl_staging_mb:
        return None
    try:
        return StagingArea(f"kvstore-{time.time_ns()}", settings.nixl_staging_mb << 20,
                           settings.stage_lease_s)
    except Exception as e:  # noqa: BLE001 - NIXL and UCX raise their own types
        log.warning("NIXL staging unavailable; blocks go through gRPC only",
                    extra={"staging_mb": settings.nixl_staging_mb,
                           "error": f"{type(e).__name__}: {e}"})
        return None


async def _watch_writes(store: BlockStore, health, stop: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
    last = None
    while not stop.is_set():
        ok = store.accepting_writes
        if ok != last:
            await health.set(WRITE_HEALTH, SERVING if ok else NOT_SERVING)
            last = ok
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


async def run(settings: KVStoreSettings) -> None:
    keep_large_buffers_on_heap()  # KV blocks of megabytes: see cache/memory.py
    security.configure(settings)  # before any server or channel exists
    if settings.low_watermark > settings.high_watermark:
        raise ValueError("--low-watermark must not exceed --high-watermark")
    store = open_store(settings)
    staging = open_staging(settings)
    servicer = KVStoreServicer(store, staging)
    server, port, health = await create_server(
        [lambda s: kvstore_pb2_grpc.add_KVStoreServicer_to_server(servicer, s)],
        [kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name],
        settings.host, settings.port,
    )
    await health.set("", SERVING)
    await health.set("pdserve.v1.KVStore", SERVING)

    async def publish(accepting: bool) -> None:
        await health.set(WRITE_HEALTH, SERVING if accepting else NOT_SERVING)

    servicer.on_write_state = publish  # type: ignore[method-assign]
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_writes(store, health, stop))
    poller = asyncio.create_task(staging.poll()) if staging is not None else None
    prom = CollectorRegistry()
    prom.register(StoreCollector(lambda: store.stats))
    if staging is not None:
        prom.register(StagingCollector(staging))
    metrics_port = serve_metrics(prom, settings.host, settings.metrics_port)
    write_ready_file(settings.ready_file, port, metrics_port=metrics_port)
    log.info("kvstore serving", extra={"port": port, "blocks": store.stats.num_blocks})

    async def cleanup() -> None:
        stop.set()
        await watcher
        if poller is not None:
            poller.cancel()
            staging.close()
        await asyncio.to_thread(store.close)

    await serve_until_signal(server, health, cleanup)
