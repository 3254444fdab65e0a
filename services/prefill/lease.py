"""A decode reservation's lease as the prefill worker writing into it sees it.

The decode worker frees reserved pages whose KV has not landed within the lease
(`Reservation.lease_s`, 60 s by default), and the prefill worker starts no WRITE after it. A
prompt may wait longer than that here: the deadline order lets a long prompt wait up to
`prefill_slack` times its own time, a deferral up to `--prefill-defer-wait-s` since its
arrival. So while a request is here, `Lease.keep` renews the lease with the decode worker
(`Decode.Renew`, at `PrefillRequest.decode_address`) every third of it (one that failed:
again soon), and the lease this worker checks before a WRITE is the last one the decode
worker granted, counted from when this worker asked (so never later than the decode worker's
own); with under a third of it left, the final WRITE renews it first, so the KV lands inside
it, not at its edge. A decode worker that no
longer holds the reservation (expired, released, restarted) answers `renewed: false`: the
lease is lost, no WRITE starts, and the worker fails the request at once (`UNAVAILABLE`,
blamed on decode, so the gateway tries another) instead of computing it for nothing. The
renewals stop with the request: a gateway that goes
away cancels its Prefill call, and the reservation then runs out as before.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.services.errors import TransferError
from pdserve.services.server import Stubs
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)

RETRY_S = 0.25  # a renewal that failed is asked again this soon (at most a third of the lease)


def decode_peers() -> Stubs[decode_pb2_grpc.DecodeAsyncStub]:
    """Stubs for the decode workers whose reservations this worker renews."""
    return Stubs(lambda ch: decode_pb2_grpc.DecodeStub(ch))


class Lease:
    """The reservation `res`'s lease from now (none if its `lease_s` is 0), renewed with the
    decode worker at `stub` (None: not renewed)."""

    def __init__(self, res: common_pb2.Reservation,
                 stub: decode_pb2_grpc.DecodeAsyncStub | None = None) -> None:
        self.res = res
        self.stub = stub
        self.end: float | None = time.monotonic() + res.lease_s if res.lease_s else None
        self.lost = False      # the decode worker said the reservation no longer waits
        self.writing = False   # the final WRITE started (within the lease): renewals are over
        self.renewals = 0

    def over(self) -> bool:
        """No WRITE may start into the reservation's pages any more."""
        return self.lost or (self.end is not None and time.monotonic() > self.end)

    async def begin_write(self) -> None:
        """The final WRITE starts now: TransferError if the lease is over, else no renewal
        is needed any more. With less than a third of the lease left (the renewals ran late:
        a busy worker), it is renewed first, so that the WRITE and its notice land within it
        rather than at its edge, after the decode worker let the reservation go."""
        if (self.stub is not None and self.end is not None and not self.over()
                and self.end - time.monotonic() < self.res.lease_s / 3):
            await self._renew(self.stub)
        self.check()
        self.writing = True

    def check(self) -> None:
        if self.lost:
            raise TransferError("KV transfer not started: the decode worker no longer holds "
                                "the reservation (its lease was not renewed in time)")
        if self.over():
            raise TransferError(f"KV transfer not started: the decode reservation's "
                                f"{self.res.lease_s:g} s lease ended first")

    async def keep(self) -> None:
        """Renews the lease every third of it until the final WRITE starts, the lease is
        over or lost, or it is cancelled; nothing without a lease or a decode worker to ask.
        A renewal that fails to arrive (a busy or unreachable decode worker) is tried again
        after RETRY_S while the lease lasts, not a third later: two thirds of the lease are
        left then, and one late answer must not use them up."""
        if self.end is None or self.stub is None:
            return
        every = self.res.lease_s / 3
        wait = every
        while True:
            await asyncio.sleep(wait)
            if self.over() or self.writing:
                return
            renewed = await self._renew(self.stub)
            if self.lost or self.writing:
                return
            wait = every if renewed else min(every, RETRY_S)

    async def _renew(self, stub: decode_pb2_grpc.DecodeAsyncStub) -> bool:
        """One renewal; True when the decode worker granted it. A reservation it no longer
        holds sets `lost`. The call waits at most a third of the lease."""
        asked = time.monotonic()
        try:
            resp = await stub.Renew(decode_pb2.RenewRequest(
                request_id=self.res.request_id, epoch=self.res.epoch),
                timeout=self.res.lease_s / 3)
        except grpc.aio.AioRpcError as e:
            log.warning("decode lease not renewed, trying again", extra={
                "request_id": self.res.request_id, "error": e.details()})
            return False
        if self.writing:  # it may have landed meanwhile: decode runs it now
            return False
        if not resp.renewed:
            self.lost = True
            log.warning("decode reservation gone while the prompt waited", extra={
                "request_id": self.res.request_id})
            return False
        self.end = asked + resp.lease_s
        self.renewals += 1
        return True
