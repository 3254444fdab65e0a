"""The decode worker's request state machine (services/decode/requests.py), on a real page pool
and an injected clock: every transition, the pages each one holds or frees, and the quarantine
that keeps a late WRITE away from reused pages."""

from __future__ import annotations

import grpc
import pytest

from pdserve.engine.errors import OutOfPages
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.layout import KVLayout
from pdserve.engine.sampling import SamplingParams
from pdserve.services.decode.requests import DecodeRequests, DecodeState
from pdserve.services.errors import AlreadyExists
from pdserve.v1 import common_pb2
from tests.helpers import FakeClock

EPOCH = 7
LEASE_S, QUARANTINE_S = 10.0, 5.0


def table(num_pages: int = 16) -> tuple[DecodeRequests, KVPool, FakeClock]:
    pool = KVPool(KVLayout(num_layers=2, kv_dim=8, dtype="float32", block_tokens=4), num_pages)
    clock = FakeClock()
    return DecodeRequests(pool, LEASE_S, QUARANTINE_S, clock), pool, clock


def notice(rid: str, tokens: int, checksum: int = 42, epoch: int = EPOCH,
           first: int = 5) -> common_pb2.TransferNotice:
    return common_pb2.TransferNotice(request_id=rid, epoch=epoch, first_token=first,
                                     num_prompt_tokens=tokens, kv_checksum=checksum)


def good(pages: list) -> int:
    return 42


def test_reserve_holds_prompt_and_max_tokens_pages_and_refuses_twice():
    t, pool, _ = table()
    r = t.reserve("a", list(range(10)), SamplingParams(max_tokens=7))
    assert r.state is DecodeState.RESERVED
    assert len(r.seq.pages) == 4  # 10 + 7 - 1 = 16 tokens of KV, 4 per page
    assert pool.num_free == 12 and t.waiting_for_kv and t.busy
    with pytest.raises(AlreadyExists, match="'a'"):
        t.reserve("a", [1], SamplingParams(max_tokens=1))
    with pytest.raises(OutOfPages):
        t.reserve("b", list(range(60)), SamplingParams(max_tokens=1))
    pool.check_integrity()


def test_a_matching_notice_lands_and_the_engine_finishes_it():
    t, pool, _ = table()
    r = t.reserve("a", list(range(10)), SamplingParams(max_tokens=3))
    seen: list[list] = []
    landed = t.land(notice("a", 10), EPOCH, lambda pages: seen.append(pages) or 42)
    assert landed is r and r.state is DecodeState.RUNNING and r.seq.output == [5]
    assert seen == [r.seq.pages[:3]]  # the checksum covers the prompt's pages only
    assert t.count(DecodeState.RUNNING) == 1 and not t.waiting_for_kv
    assert t.finish("a") is r and r.state is DecodeState.DONE
    assert t.get("a") is None and t.num_finished == 1
    assert t.finish("a") is None  # once
    pool.release(r.seq.pages)  # (the engine frees a finished sequence's pages)
    pool.check_integrity()


@pytest.mark.parametrize("bad, why", [
    (dict(tokens=9), "covers 9 tokens, prompt has 10"),
    (dict(checksum=41), "checksum mismatch")])
def test_a_notice_that_does_not_match_fails_closed_and_frees_the_pages(bad, why):
    t, pool, _ = table()
    t.reserve("a", list(range(10)), SamplingParams(max_tokens=3))
    r = t.land(notice("a", bad.get("tokens", 10), bad.get("checksum", 42)), EPOCH, good)
    assert r is not None and r.state is DecodeState.FAILED
    assert r.error is not None and r.error.code == grpc.StatusCode.DATA_LOSS
    assert why in r.error.message
    assert pool.num_free == pool.num_pages and t.get("a") is None and t.num_failed == 1


def test_stale_or_unknown_notices_are_dropped():
    t, _, _ = table()
    r = t.reserve("a", list(range(10)), SamplingParams(max_tokens=3))
    assert t.land(notice("a", 10, epoch=EPOCH - 1), EPOCH, good) is None
    assert t.land(notice("zzz", 10), EPOCH, good) is None
    assert r.state is DecodeState.RESERVED


def test_no_notice_within_the_lease_expires_then_the_pages_wait_out_the_quarantine():
    t, pool, clock = table()
    r = t.reserve("a", list(range(10)), SamplingParams(max_tokens=3))
    clock.advance(LEASE_S - 0.1)
    assert t.expire() == ([], False)
    clock.advance(0.2)
    expired, freed = t.expire()
    assert expired == [r] and not freed and r.state is DecodeState.EXPIRED
    assert r.error is not None and r.error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert t.get("a") is None and t.quarantined_pages == 3 and pool.num_free == 13
    # A notice after the lease (a slow prefill) finds no request: its bytes land in pages
    # nobody reads.
    assert t.land(notice("a", 10), EPOCH, good) is None
    clock.advance(QUARANTINE_S)  # lease + quarantine after the reservation
    assert t.expire() == ([], True)
    assert t.quarantined_pages == 0 and pool.num_free == pool.num_pages
    pool.check_integrity()


def test_a_renewed_lease_runs_from_the_renewal_and_the_quarantine_follows_it():
    t, pool, clock = table()
    r = t.reserve("a", list(range(10)), SamplingParams(max_tokens=3))
    for _ in range(3):  # three renewals, each within the lease: 3 leases past the first
        clock.advance(LEASE_S - 0.1)
        assert t.renew("a")
        assert t.expire() == ([], False) and r.state is DecodeState.RESERVED
    renewed_at = clock()
    clock.advance(LEASE_S + 0.1)
    assert not t.renew("a")  # over: a renewal cannot bring it back
    expired, _ = t.expire()
    assert expired == [r] and t.quarantined_pages == 3
    # The pages are held for the quarantine after the last lease, not after the first one.
    clock.advance(renewed_at + LEASE_S + QUARANTINE_S - clock() - 0.1)
    assert t.expire() == ([], False) and t.quarantined_pages == 3
    clock.advance(0.2)
    assert t.expire() == ([], True) and pool.num_free == pool.num_pages
    # Nothing else renews: an unknown id, a landed (running) or released request.
    assert not t.renew("zzz")
    t.reserve("b", list(range(4)), SamplingParams(max_tokens=1))
    t.land(notice("b", 4), EPOCH, good)
    assert not t.renew("b")
    t.reserve("c", list(range(4)), SamplingParams(max_tokens=1))
    t.release("c")
    assert not t.renew("c")


def test_release_before_the_kv_quarantines_and_release_while_running_leaves_it_to_the_engine():
    t, pool, clock = table()
    t.reserve("a", list(range(10)), SamplingParams(max_tokens=3))
    assert t.release("a") is DecodeState.RESERVED
    assert t.quarantined_pages == 3 and t.get("a") is None  # 10 + 3 - 1 tokens: 3 pages
    assert t.release("a") is None
    b = t.reserve("a", list(range(4)), SamplingParams(max_tokens=1))  # the id is free again
    t.land(notice("a", 4), EPOCH, good)
    assert t.release("a") is DecodeState.RUNNING and b.state is DecodeState.DONE
    assert b.seq.pages  # still the engine's to free (it aborts the sequence)
    clock.advance(LEASE_S + QUARANTINE_S)
    t.expire()
    assert t.quarantined_pages == 0 and pool.num_free == pool.num_pages - len(b.seq.pages)


def test_release_of_a_reservation_no_prefill_was_given_frees_its_pages_at_once():
    t, pool, _ = table()
    t.reserve("a", list(range(10)), SamplingParams(max_tokens=3))
    assert t.release("a", unwritten=True) is DecodeState.RESERVED
    assert t.quarantined_pages == 0 and pool.num_free == pool.num_pages and t.get("a") is None
    pool.check_integrity()
    b = t.reserve("b", list(range(10)), SamplingParams(max_tokens=3))  # running: the engine's
    t.land(notice("b", 10), EPOCH, good)
    assert t.release("b", unwritten=True) is DecodeState.RUNNING and b.seq.pages
