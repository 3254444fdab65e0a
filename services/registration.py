"""Worker side of the registry: join the gateway and keep streaming load reports.

The stream is the membership: the gateway takes a worker out of rotation when its stream ends
or goes quiet, so a worker that dies needs no deregistration. On any failure the worker
reconnects after a short pause and registers again (same epoch: same process, same memory).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from pdserve.services.server import channel
from pdserve.v1 import common_pb2, registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.1


async def join_gateway(
    address: str,
    info: common_pb2.WorkerInfo,
    load: Callable[[], common_pb2.LoadReport],
    stop: asyncio.Event,
    changed: asyncio.Event | None = None,
) -> None:
    async with channel(address) as ch:
        stub = registry_pb2_grpc.RegistryStub(ch)
        while not stop.is_set():

            async def messages() -> AsyncIterator[registry_pb2.WorkerMessage]:
                yield registry_pb2.WorkerMessage(register=info)
                while not stop.is_set():
                    yield registry_pb2.WorkerMessage(load=load())
                    # Report every interval, or at once when the load changed.
                    waiter = changed.wait() if changed else asyncio.sleep(REPORT_INTERVAL_S)
                    try:
                        await asyncio.wait_for(waiter, REPORT_INTERVAL_S)
                    except asyncio.TimeoutError:
                        pass
                    if changed:
                        changed.clear()

            try:
                await stub.Join(messages())
            except grpc.aio.AioRpcError as e:
                log.info("gateway connection lost", extra={"code": e.code().name})
            if not stop.is_set():
                await asyncio.sleep(0.5)
