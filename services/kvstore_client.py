"""Client of the kvstore service. Every failure is a miss: an unreachable or slow store never
fails a request, it only costs recompute."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from pdserve.services.server import channel
from pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc

log = logging.getLogger(__name__)


class KVStoreClient:
    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = channel(address) if address else None
        self._stub = kvstore_pb2_grpc.KVStoreStub(self._channel) if self._channel else None

    @property
    def enabled(self) -> bool:
        return self._stub is not None

    async def lookup(self, keys: Sequence[bytes]) -> int | None:
        """Leading stored blocks, or None when the store could not answer."""
        if self._stub is None or not keys:
            return 0 if self._stub is not None else None
        try:
            r = await self._stub.Lookup(kvstore_pb2.LookupRequest(keys=list(keys)),
                                        timeout=self.timeout_s)
            return r.num_prefix
        except grpc.aio.AioRpcError as e:
            log.warning("kvstore lookup failed", extra={"code": e.code().name})
            return None

    async def get(self, keys: Sequence[bytes]) -> list[bytes]:
        """Blocks for the leading keys that could be fetched (possibly fewer, possibly none)."""
        if self._stub is None or not keys:
            return []
        out: list[bytes] = []
        try:
            call = self._stub.Get(kvstore_pb2.GetRequest(keys=list(keys)),
                                  timeout=self.timeout_s + 0.05 * len(keys))
            async for block in call:
                if block.key != keys[len(out)]:
                    break
                out.append(block.value)
        except grpc.aio.AioRpcError as e:
            log.warning("kvstore get failed", extra={"code": e.code().name, "got": len(out)})
        return out

    async def put(self, blocks: Sequence[tuple[bytes, bytes]]) -> int:
        if self._stub is None or not blocks:
            return 0

        async def gen():
            for k, v in blocks:
                yield kvstore_pb2.Block(key=k, value=v)

        try:
            r = await self._stub.Put(gen(), timeout=self.timeout_s + 0.05 * len(blocks))
            return r.stored
        except grpc.aio.AioRpcError as e:
            log.warning("kvstore put failed", extra={"code": e.code().name})
            return 0

    async def ready(self) -> bool:
        if self._channel is None:
            return False
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            r = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.timeout_s)
            return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            return False

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
