"""`pdserve kvstore`: start-up and shutdown of one kvstore shard.

Lifecycle of a block:
1. A prefill worker computes a full block that the store lacks and `Put`s it (best effort,
   after its request's KV transfer, off the request path).
2. The gateway `Lookup`s a prompt's hash chain to learn how many leading blocks are stored.
3. A prefill worker `Stage`s those blocks and READs them over NIXL (staging.py), or `Get`s them
   whole or in layer-group parts over gRPC, and loads them instead of computing them.
4. Every read is verified; a corrupt block is deleted and served as a miss (cache/store.py).

Startup: open the store under --data-dir/kvstore (a second start finds the same blocks), the
NIXL staging buffer, serve, write the ready file. Shutdown: NOT_SERVING, drain RPCs, close the
database.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry

from pdserve.cache.memory import keep_large_buffers_on_heap
from pdserve.cache.store import BlockStore
from pdserve.config import KVStoreSettings
from pdserve.metrics import StagingCollector, StoreCollector, serve_metrics
from pdserve.services import security
from pdserve.services.kvstore.servicer import KVStoreServicer
from pdserve.services.kvstore.staging import StagingArea
from pdserve.services.server import (
    NOT_SERVING,
    SERVING,
    HealthServicer,
    create_server,
    serve_until_signal,
    write_ready_file,
)
from pdserve.startup import PHASES, phase
from pdserve.supervise import DirLock
from pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc

log = logging.getLogger(__name__)

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
                           settings.stage_lease_s, settings.stage_in_place)
    except Exception as e:  # noqa: BLE001 - NIXL and UCX raise their own types
        log.warning("NIXL staging unavailable; blocks go through gRPC only",
                    extra={"staging_mb": settings.nixl_staging_mb,
                           "error": f"{type(e).__name__}: {e}"})
        return None


async def _watch_writes(store: BlockStore, health: HealthServicer,
                        stop: asyncio.Event) -> None:
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
    # One kvstore per directory; a second fails here naming it and the holder.
    lock = DirLock(settings.data_dir / "kvstore", ".lock", "--data-dir", "a kvstore")
    store = open_store(settings)
    phase("store open")
    staging = open_staging(settings)
    phase("NIXL registration")
    servicer = KVStoreServicer(store, staging)
    server, port, health_servicer = await create_server(
        [lambda s: kvstore_pb2_grpc.add_KVStoreServicer_to_server(servicer, s)],
        [kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name],
        settings.host, settings.port,
    )
    await health_servicer.set("", SERVING)
    await health_servicer.set("pdserve.v1.KVStore", SERVING)

    async def publish(accepting: bool) -> None:
        await health_servicer.set(WRITE_HEALTH, SERVING if accepting else NOT_SERVING)

    servicer.on_write_state = publish
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_writes(store, health_servicer, stop))
    poller = asyncio.create_task(staging.poll()) if staging is not None else None
    prom = CollectorRegistry()
    prom.register(StoreCollector(lambda: store.stats))
    if staging is not None:
        prom.register(StagingCollector(staging))
    metrics_port = serve_metrics(prom, settings.host, settings.metrics_port)
    phase("serving")
    write_ready_file(settings.ready_file, port, metrics_port=metrics_port, phases=PHASES)
    log.info("kvstore serving", extra={"port": port, "blocks": store.stats.num_blocks})

    async def cleanup() -> None:
        stop.set()
        await watcher
        if poller is not None and staging is not None:
            poller.cancel()
            staging.close()
        await asyncio.to_thread(store.close)
        lock.release()

    await serve_until_signal(server, health_servicer, cleanup)
