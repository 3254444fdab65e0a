"""`pdserve decode`: start-up and shutdown of one decode worker.

Startup: load model, allocate the pool, register it with NIXL, start the engine thread, serve,
join the gateway. Shutdown (SIGTERM): report draining (out of rotation), let accepted requests
finish (`drain_timeout_s`), NOT_SERVING, stop the server, stop the engine thread.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from pdserve.config import DecodeSettings
from pdserve.metrics import DecodeMetrics, watch_ep
from pdserve.services import security
from pdserve.services.cpu_turns import CpuTurns
from pdserve.services.decode.servicer import DecodeServicer
from pdserve.services.decode.worker import DecodeWorker
from pdserve.services.worker import (
    ep_hooks,
    in_passing_thread,
    load_for,
    serve_worker,
)
from pdserve.v1 import decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)


def build(settings: DecodeSettings) -> DecodeWorker:
    loaded = load_for(settings, decode_only=True)
    return DecodeWorker(loaded, settings.num_pages, settings.max_batch, settings.lease_s,
                        settings.device, agent_name=settings.worker_id or "decode",
                        quarantine_s=settings.quarantine_s,
                        turns=CpuTurns(settings.cpu_turns_path),
                        # a thread count that changes could change a product's bits
                        adapt_threads=settings.adapt_threads and not settings.batch_invariant,
                        wrap_hooks=lambda inner: ep_hooks(settings, loaded, inner))


async def run(settings: DecodeSettings) -> None:
    security.configure(settings)  # before any server or channel exists
    # Model load and pool allocation in a thread that exits (worker.in_passing_thread says why).
    worker = in_passing_thread(lambda: build(settings))
    changed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def report_now() -> None:  # from any thread
        loop.call_soon_threadsafe(changed.set)

    worker.on_change = report_now
    prom = CollectorRegistry()
    worker.export_metrics(DecodeMetrics(prom))
    watch_ep(prom, worker.engine.hooks)
    worker.start()
    servicer = DecodeServicer(worker)

    async def cleanup() -> None:
        worker.stop()

    await serve_worker("decode", settings, worker,
                       lambda s: decode_pb2_grpc.add_DecodeServicer_to_server(servicer, s),
                       decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name, prom,
                       lambda: worker.busy, cleanup, changed)
