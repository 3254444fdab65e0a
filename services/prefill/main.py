"""`pdserve prefill`: start-up and shutdown of one prefill worker.

Startup: load the model and allocate the pool (in a passing thread), register the pool with
NIXL, start the engine thread, serve, join the gateway. Shutdown (SIGTERM): report draining,
let queued prefills finish (`drain_timeout_s`), NOT_SERVING, stop the server, wait for pending
block writes, stop the engine thread.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from pdserve.cache.memory import keep_large_buffers_on_heap
from pdserve.config import PrefillSettings
from pdserve.engine.scheduler import Deferral
from pdserve.metrics import (
    PrefillMetrics,
    PrefillOrderCollector,
    StoreReadCollector,
    watch_ep,
)
from pdserve.services import security
from pdserve.services.cpu_turns import CpuTurns
from pdserve.services.kvstore_client import KVStoreClient
from pdserve.services.prefill.servicer import PrefillServicer
from pdserve.services.prefill.worker import PrefillWorker
from pdserve.services.worker import (
    ep_hooks,
    in_passing_thread,
    load_for,
    serve_worker,
)
from pdserve.v1 import prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)


def build(settings: PrefillSettings, kvstore: KVStoreClient) -> PrefillWorker:
    loaded = load_for(settings)
    return PrefillWorker(
        loaded, settings.num_pages, kvstore, settings.prefill_chunk_tokens,
        settings.transfer_timeout_s, settings.device,
        agent_name=settings.worker_id or "prefill",
        batch_wait_s=settings.prefill_batch_wait_ms / 1000,
        fetch_layer_groups=settings.kv_fetch_layer_groups,
        fetch_nixl=settings.kv_fetch == "nixl", read_lanes=settings.kv_read_lanes,
        turns=CpuTurns(settings.cpu_turns_path),
        wrap_hooks=lambda inner: ep_hooks(settings, loaded, inner),
        prefill_slack=settings.prefill_slack,
        deferral=Deferral(settings.prefill_defer_share, settings.prefill_defer_lateness_s,
                          settings.prefill_defer_wait_s))


async def run(settings: PrefillSettings) -> None:
    keep_large_buffers_on_heap()  # KV blocks of megabytes: see cache/memory.py
    security.configure(settings)  # before any server or channel exists
    kvstore = KVStoreClient(settings.kvstore, settings.kvstore_timeout_s)
    # Model load and pool allocation in a thread that exits (worker.in_passing_thread says why).
    worker = in_passing_thread(lambda: build(settings, kvstore))
    prom = CollectorRegistry()
    worker.export_metrics(PrefillMetrics(prom))
    prom.register(StoreReadCollector(worker.endpoint))
    prom.register(PrefillOrderCollector(worker.engine.scheduler))
    watch_ep(prom, worker.engine.hooks)
    worker.start()
    servicer = PrefillServicer(worker)
    connecting = asyncio.create_task(worker.connect_stores())  # in the background

    async def cleanup() -> None:
        connecting.cancel()
        await worker.stop()
        await kvstore.close()

    await serve_worker("prefill", settings, worker,
                       lambda s: prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, s),
                       prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name, prom,
                       lambda: worker.load.in_flight > 0, cleanup)
