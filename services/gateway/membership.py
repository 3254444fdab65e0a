"""The gateway's Registry service: workers join, stream load reports, and leave by hanging up.

Also owns cluster readiness: the gateway reports SERVING (service "" and pdserve.v1.Gateway)
only while at least one prefill and one decode worker are in rotation and the kvstore answered
at least once (a kvstore outage later only turns hits into misses).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pdserve.scheduler.balancers import DUE_HORIZONS_S
from pdserve.scheduler.errors import RegistryError
from pdserve.scheduler.registry import Load, Role, WorkerRegistry, WorkerSpec
from pdserve.services.errors import FailedPrecondition, InvalidArgument, answers_errors
from pdserve.services.kvstore_client import KVStoreClient
from pdserve.services.limits import MAX_ADDRESS, MAX_WORKER_ID
from pdserve.services.server import NOT_SERVING, SERVING, HealthServicer
from pdserve.v1 import common_pb2, registry_pb2, registry_pb2_grpc

if TYPE_CHECKING:
    from pdserve.services.server import Context

log = logging.getLogger(__name__)


def spec_of(info: common_pb2.WorkerInfo) -> WorkerSpec:
    return WorkerSpec(
        worker_id=info.worker_id, role=Role(info.role), address=info.address, epoch=info.epoch,
        hash_namespace=info.hash_namespace, layout_fingerprint=info.layout_fingerprint,
        block_tokens=info.block_tokens, total_pages=info.total_pages,
        max_context=info.max_context, vocab_size=info.vocab_size, model_id=info.model_id,
        ep_group=info.ep_group, ep_rank=info.ep_rank, ep_size=max(1, info.ep_size),
        ep_epoch=info.ep_epoch)


def load_of(r: common_pb2.LoadReport) -> Load:
    return Load(free_pages=r.free_pages, total_pages=r.total_pages, running=r.running,
                waiting=r.waiting, queued_tokens=r.queued_tokens,
                queued_attention=r.queued_attention, draining=r.draining,
                num_finished=r.num_finished, due_s=_due_of(r),
                prefill_rate=_nonnegative(r.prefill_rate),
                prefill_slack=_nonnegative(r.prefill_slack),
                defer_wait_s=_nonnegative(r.defer_wait_s))


def _nonnegative(x: float) -> float:
    return x if math.isfinite(x) and x >= 0 else 0.0


def _due_of(r: common_pb2.LoadReport) -> tuple[float, ...]:
    """The reported due profile, or none when it is not one (a tie-break, not worth failing
    a worker's reports over)."""
    due = tuple(r.due_s)
    ok = len(due) == len(DUE_HORIZONS_S) and all(math.isfinite(x) and x >= 0 for x in due)
    return due if ok else ()


def check_info(info: common_pb2.WorkerInfo) -> None:
    """InvalidArgument naming the field of a registration that cannot be taken."""
    if info.role not in tuple(Role):
        raise InvalidArgument(f"register.role: {info.role!r}, must be 'prefill' or 'decode'")
    if not 0 < len(info.worker_id) <= MAX_WORKER_ID:
        raise InvalidArgument(f"register.worker_id: {len(info.worker_id)} characters, must be "
                              f"1..{MAX_WORKER_ID}")
    host, _, port = info.address.rpartition(":")
    if (not host or not port.isdigit() or not 0 < int(port) < 65536
            or len(info.address) > MAX_ADDRESS):
        raise InvalidArgument(f"register.address: {info.address[:80]!r}, expected host:port")
    for name in ("block_tokens", "total_pages", "max_context", "vocab_size"):
        if getattr(info, name) <= 0:
            raise InvalidArgument(f"register.{name}: {getattr(info, name)}, must be > 0")
    if info.ep_size > 1:
        if not 0 <= info.ep_rank < info.ep_size:
            raise InvalidArgument(f"register.ep_rank: {info.ep_rank}, must be in "
                                  f"0..{info.ep_size - 1}")
        if not 0 < len(info.ep_group) <= MAX_WORKER_ID:
            raise InvalidArgument(f"register.ep_group: {len(info.ep_group)} characters, must "
                                  f"be 1..{MAX_WORKER_ID}")


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, registry: WorkerRegistry) -> None:
        self.registry = registry

    @answers_errors
    async def Join(self, request_iterator: AsyncIterator[registry_pb2.WorkerMessage],
                   context: Context) -> registry_pb2.JoinResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("register"):
            raise InvalidArgument("first message: must be `register` (WorkerInfo)")
        info = first.register
        check_info(info)
        try:
            state = self.registry.join(spec_of(info), time.monotonic())
        except RegistryError as e:
            raise FailedPrecondition(str(e)) from None
        log.info("worker joined", extra={"worker_id": info.worker_id, "role": info.role})
        try:
            async for msg in request_iterator:
                if msg.HasField("load"):
                    if not self.registry.report(info.worker_id, info.epoch, load_of(msg.load),
                                                time.monotonic()):
                        break  # replaced by a newer epoch
        finally:
            if self.registry.leave(state):
                log.info("worker left", extra={"worker_id": info.worker_id})
        return registry_pb2.JoinResponse(reason="stream closed")


class Readiness:
    """Whether the gateway serves, for the HTTP edge's GET /health and the gRPC health
    service: ready (a prefill and a decode worker in rotation, the store reachable) and not
    draining."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False

    def serving(self) -> bool:
        return self.ready and not self.draining


async def watch_readiness(registry: WorkerRegistry, health_servicer: HealthServicer,
                          kvstore: KVStoreClient, worker_timeout_s: float,
                          stop: asyncio.Event, readiness: Readiness | None = None) -> None:
    """Keeps the health status in step with the registry; expires silent workers."""
    store_ok = not kvstore.enabled  # no store configured: nothing to wait for
    last = None
    next_store_check = 0.0
    while not stop.is_set():
        now = time.monotonic()
        for wid in registry.expire(now, worker_timeout_s):
            log.warning("worker silent, out of rotation", extra={"worker_id": wid})
        if not store_ok and now >= next_store_check:
            store_ok = await kvstore.ready()
            next_store_check = now + 0.5
        ready = (store_ok and bool(registry.active(Role.PREFILL))
                 and bool(registry.active(Role.DECODE)))
        if readiness is not None:
            readiness.ready = ready
            ready = readiness.serving()  # a draining gateway is not ready either
        if ready != last:
            status = SERVING if ready else NOT_SERVING
            await health_servicer.set("", status)
            await health_servicer.set("pdserve.v1.Gateway", status)
            log.info("readiness changed", extra={"ready": ready})
            last = ready
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except asyncio.TimeoutError:
            pass
