"""The prefill side of a decode lease (services/prefill/lease.py): the final WRITE starts only
within the lease, and with little of it left, only after a renewal.

The decode worker here is a stand-in that answers `Renew` as DecodeRequests.renew does (the
real one is in tests/services/test_transfer.py and the cluster tests): what is tested is the
lease's own bookkeeping."""

from __future__ import annotations

import time

import pytest

from pdserve.services.errors import TransferError
from pdserve.services.prefill.lease import Lease
from pdserve.v1 import common_pb2, decode_pb2


class Decode:
    def __init__(self, renewed: bool = True, lease_s: float = 3.0) -> None:
        self.renewed = renewed
        self.lease_s = lease_s
        self.calls: list[str] = []

    async def Renew(self, req: decode_pb2.RenewRequest, timeout: float
                    ) -> decode_pb2.RenewResponse:
        self.calls.append(req.request_id)
        return decode_pb2.RenewResponse(renewed=self.renewed,
                                        lease_s=self.lease_s if self.renewed else 0.0)


def reservation(lease_s: float = 3.0) -> common_pb2.Reservation:
    return common_pb2.Reservation(request_id="r", epoch=7, lease_s=lease_s)


async def test_a_write_with_most_of_the_lease_left_starts_without_a_renewal():
    decode = Decode()
    lease = Lease(reservation(), decode)  # type: ignore[arg-type]  # (the stand-in stub)
    await lease.begin_write()
    assert lease.writing and decode.calls == [] and lease.renewals == 0


async def test_a_write_near_the_lease_s_end_renews_it_first():
    decode = Decode()
    lease = Lease(reservation(), decode)  # type: ignore[arg-type]  # (the stand-in stub)
    assert lease.end is not None
    lease.end = time.monotonic() + 0.2  # the renewals ran late: 0.2 of 3 s left
    await lease.begin_write()
    assert decode.calls == ["r"] and lease.renewals == 1 and lease.writing
    assert lease.end - time.monotonic() > 2.5  # a whole lease again


async def test_a_write_near_the_end_of_a_reservation_the_decode_worker_let_go_never_starts():
    decode = Decode(renewed=False)
    lease = Lease(reservation(), decode)  # type: ignore[arg-type]  # (the stand-in stub)
    assert lease.end is not None
    lease.end = time.monotonic() + 0.2
    with pytest.raises(TransferError, match="no longer holds"):
        await lease.begin_write()
    assert lease.lost and not lease.writing


async def test_without_a_decode_address_a_lease_that_ended_stops_the_write():
    lease = Lease(reservation())
    assert lease.end is not None
    lease.end = time.monotonic() + 0.2
    await lease.begin_write()  # within it still: no renewal to ask for
    lease2 = Lease(reservation())
    lease2.end = time.monotonic() - 0.01
    with pytest.raises(TransferError, match="lease ended first"):
        await lease2.begin_write()


async def test_a_renewal_that_failed_is_asked_again_soon_not_a_third_of_the_lease_later(
        monkeypatch):
    """(A decode worker too busy to answer in time, then answering.) The waits between
    renewals are recorded instead of slept."""
    import types

    import grpc

    from pdserve.services.prefill import lease as lease_module

    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(lease_module, "asyncio", types.SimpleNamespace(sleep=sleep))
    answers = iter(["busy", True, False])

    class Busy(Decode):
        async def Renew(self, req, timeout):
            self.calls.append(req.request_id)
            answer = next(answers)
            if answer == "busy":
                raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                           grpc.aio.Metadata(), grpc.aio.Metadata(), "busy")
            return decode_pb2.RenewResponse(renewed=answer, lease_s=3.0 if answer else 0.0)

    decode = Busy()
    lease = Lease(reservation(3.0), decode)  # type: ignore[arg-type]  # (the stand-in stub)
    await lease.keep()
    assert decode.calls == ["r", "r", "r"]
    assert waits == [1.0, lease_module.RETRY_S, 1.0]  # a third, soon after the failure, a third
    assert lease.renewals == 1 and lease.lost
