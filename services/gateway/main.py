"""`pdserve gateway`: start-up and shutdown of the gateway.

Startup: the tokenizer, the worker registry and its balancers, the kvstore client, the ledger,
the public server (and, with mutual TLS, an internal one for the registry), the readiness
watcher. Shutdown: NOT_SERVING, finish in-flight RPCs, write every queued ledger row.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from pdserve.cache.ledger import Ledger
from pdserve.config import GatewaySettings
from pdserve.engine.files import load_tokenizer
from pdserve.metrics import GatewayMetrics, serve_metrics
from pdserve.scheduler.registry import Role, WorkerRegistry
from pdserve.services import security
from pdserve.services.gateway.accounting import kv_usage
from pdserve.services.gateway.auth import TokenTable
from pdserve.services.gateway.http_edge import Edge, HTTPEdge, bind
from pdserve.services.gateway.membership import Readiness, RegistryServicer, watch_readiness
from pdserve.services.gateway.servicer import GatewayServicer
from pdserve.services.kvstore_client import KVStoreClient
from pdserve.services.server import (
    SERVING,
    create_server,
    serve_until_signal,
    wait_until_idle,
    write_ready_file,
)
from pdserve.startup import PHASES, phase
from pdserve.v1 import gateway_pb2, gateway_pb2_grpc, registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)


async def run(settings: GatewaySettings) -> None:
    security.configure(settings)  # before any server or channel exists
    tokenizer = load_tokenizer(settings.model)
    phase("tokenizer load")
    registry = WorkerRegistry(pipeline_min_tokens=settings.pipeline_min_tokens,
                              pipeline_max_stages=settings.pipeline_max_stages,
                              pipeline_idle_tokens=settings.pipeline_idle_tokens)
    kvstore = KVStoreClient(settings.kvstore, settings.lookup_timeout_s)
    gateway_id = settings.gateway_id or socket.gethostname()
    ledger = (Ledger(settings.data_dir, settings.ledger_flush_records, settings.ledger_flush_s,
                     settings.ledger_max_pending, gateway=gateway_id)
              if settings.ledger else None)
    prom = CollectorRegistry()
    metrics = GatewayMetrics(prom)
    def in_rotation(role: Role) -> Callable[[], int]:
        return lambda: len(registry.active(role))

    for role in Role:
        metrics.workers.labels(role.value).set_function(in_rotation(role))
    metrics.queued_tokens.set_function(
        lambda: sum(w.load.queued_tokens for w in registry.active(Role.PREFILL)))
    metrics.kv_usage.set_function(lambda: kv_usage(registry))
    tokens = TokenTable.load(settings.auth_tokens_file, settings.auth_tokens or None)
    gateway = GatewayServicer(registry, kvstore, tokenizer, ledger, metrics, settings.data_dir,
                              settings, tokens)
    reg = RegistryServicer(registry)
    add_gateway = [lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(gateway, s)]
    add_registry = [lambda s: registry_pb2_grpc.add_RegistryServicer_to_server(reg, s)]
    names = [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]
    reg_names = [registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name]
    tls = security.current()
    internal = internal_port = None
    if tls is not None and tls.mutual:
        # The registry moves to its own port, which only peers with the cluster credential
        # reach; the public port serves TLS to clients without certificates.
        internal, internal_port, ihealth = await create_server(
            add_registry, reg_names, settings.host, settings.internal_port, internal=True,
            flag="--internal-port")
        await ihealth.set("", SERVING)
        add_registry, reg_names = [], []
    server, port, health = await create_server(
        add_gateway + add_registry, names + reg_names, settings.host, settings.port,
        internal=False, max_message_bytes=settings.max_message_bytes)
    readiness = Readiness()
    edge = None
    if settings.http_port >= 0:
        edge = HTTPEdge(Edge(gateway, readiness.serving, prom, settings.max_message_bytes),
                        bind(settings.host, settings.http_port),
                        (str(settings.tls_cert_file), str(settings.tls_key_file))
                        if settings.tls_cert_file and settings.tls_key_file else None)
        edge.start()
    stop = asyncio.Event()
    watcher = asyncio.create_task(
        watch_readiness(registry, health, kvstore, settings.worker_timeout_s, stop, readiness))
    sampler = (asyncio.create_task(gateway.acct.sample_workers(settings.worker_sample_s, stop))
               if ledger is not None else None)
    metrics_port = serve_metrics(prom, settings.host, settings.metrics_port)
    phase("serving")
    write_ready_file(settings.ready_file, port, metrics_port=metrics_port, phases=PHASES,
                     internal_port=internal_port, http_port=edge.port if edge else None)
    log.info("gateway listening", extra={"port": port, "internal_port": internal_port,
                                         "http_port": edge.port if edge else None})

    async def drain() -> None:
        # Out of readiness on both ports (GET /health 503, gRPC health NOT_SERVING), then the
        # requests in flight finish, whichever edge they came by: HTTP requests run on the
        # servicer, not on the gRPC server, whose stop would not wait for them.
        readiness.draining = True
        if not await wait_until_idle(lambda: gateway.requests_in_flight > 0,
                                     settings.drain_timeout_s):
            log.warning("requests still running when the drain timed out: they are cancelled",
                        extra={"requests": gateway.requests_in_flight,
                               "drain_timeout_s": settings.drain_timeout_s})

    async def cleanup() -> None:
        if edge is not None:  # before the channels close: what still runs ends first
            await edge.stop()
        stop.set()
        await watcher
        if sampler is not None:
            await sampler
        await gateway.close()
        await kvstore.close()
        if ledger is not None:
            await asyncio.to_thread(ledger.close)  # every queued row is written
        if internal is not None:
            await internal.stop(2)

    await serve_until_signal(server, health, cleanup, drain=drain)
