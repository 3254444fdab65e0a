"""The gateway's connections to its workers (and peer gateways): one channel per address, kept,
and the calls the request flow makes that never fail it."""

from __future__ import annotations

import grpc

from pdserve.services.server import channel
from pdserve.v1 import decode_pb2, decode_pb2_grpc, gateway_pb2_grpc, prefill_pb2_grpc

RELEASE_TIMEOUT_S = 5.0


class WorkerClients:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = channel(address)
        return ch

    def decode(self, address: str) -> decode_pb2_grpc.DecodeAsyncStub:
        return decode_pb2_grpc.DecodeStub(self._channel(address))

    def prefill(self, address: str) -> prefill_pb2_grpc.PrefillAsyncStub:
        return prefill_pb2_grpc.PrefillStub(self._channel(address))

    def gateway(self, address: str) -> gateway_pb2_grpc.GatewayAsyncStub:
        """A peer gateway (Abort forwarding)."""
        return gateway_pb2_grpc.GatewayStub(self._channel(address))

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close(None)


async def release(decode: decode_pb2_grpc.DecodeAsyncStub, request_id: str,
                  unwritten: bool = False) -> None:
    """Frees a request's decode reservation (at once when `unwritten`: no prefill worker was
    ever given it); a worker that is gone, or a request already ended, is fine (its lease frees
    the pages)."""
    try:
        await decode.Release(decode_pb2.ReleaseRequest(request_id=request_id,
                                                       unwritten=unwritten),
                             timeout=RELEASE_TIMEOUT_S)
    except grpc.aio.AioRpcError:
        pass
