"""Prefill -> decode over real NIXL agents (UCX), in one process: the bytes that land are the
bytes prefill computed, and a transfer that is wrong or missing never starts decoding."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
import torch

from pdserve.engine.sampling import FinishReason, SamplingParams
from pdserve.engine.sequence import TokenEvent
from pdserve.services.decode.requests import DecodeState
from pdserve.services.decode.worker import DecodeWorker
from pdserve.services.errors import TransferError
from pdserve.services.kvstore_client import KVStoreClient
from pdserve.services.outbox import Outbox, OutboxMessage, RequestFailed
from pdserve.services.prefill.worker import PrefillWorker
from pdserve.services.transfer import pages_checksum
from pdserve.v1 import common_pb2, prefill_pb2
from tests.helpers import async_wait_until


@pytest.fixture(scope="module")
def workers(loaded):
    dec = DecodeWorker(loaded, num_pages=32, max_batch=8, lease_s=1.0, agent_name="t-decode",
                       quarantine_s=0.5)
    pre = PrefillWorker(loaded, num_pages=16, kvstore=KVStoreClient("", 1.0),
                        agent_name="t-prefill")
    dec.start()  # the real engine thread: polls notices, expires leases, decodes
    pre.start()
    yield pre, dec
    dec.stop()
    pre.thread.stop()


async def drain(outbox: Outbox, until_s: float = 30.0) -> list[OutboxMessage]:
    items: list[OutboxMessage] = []
    while True:
        item = await asyncio.wait_for(outbox.get(), until_s)
        items.append(item)
        if not isinstance(item, TokenEvent) or item.finish_reason is not None:
            return items


def prompt_rows(pool, pages, n_tokens):
    """The KV rows of the prompt's tokens (decode later writes the rows after them)."""
    bt = pool.layout.block_tokens
    rows = []
    for i, p in enumerate(pages):
        valid = min(bt, n_tokens - i * bt)
        rows.append(pool.kv[p, :, :valid].contiguous().view(torch.int32).clone())
    return rows


async def send_raw(pre, res, prompt, epoch=None, checksum_xor=0):
    """WRITEs two pages of prefill memory into a reservation with a hand-made notice."""
    pages = pre.pool.reserve(2)
    try:
        notice = common_pb2.TransferNotice(
            request_id=res.request_id, epoch=res.epoch if epoch is None else epoch, first_token=5,
            num_prompt_tokens=len(prompt),
            kv_checksum=pages_checksum(pre.pool, pages) ^ checksum_xor)
        await pre.endpoint.write(pages, res, notice, timeout_s=10)
    finally:
        pre.pool.release(pages)


@contextlib.contextmanager
def lease_of(dec, seconds):
    """Reservations made inside get a lease of `seconds`: the module's decode worker keeps
    1 s for the tests of its expiry, which a prefill that nothing renews can outlast on a
    loaded machine (a CI run's cold prefill here once did)."""
    saved = dec.requests.lease_s
    dec.requests.lease_s = seconds
    try:
        yield
    finally:
        dec.requests.lease_s = saved


def request(rid, prompt, res, max_tokens=6):
    return prefill_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt, cached_blocks_hint=0, reservation=res,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens))


async def test_kv_bytes_arrive_identical_and_decode_continues(workers, tokenizer):
    pre, dec = workers
    loop = asyncio.get_running_loop()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story. " * 12}])
    params = SamplingParams(max_tokens=6)
    with lease_of(dec, 30.0):
        res = dec.reserve("r1", prompt, params, loop)
    n = pre.layout.pages_for(len(prompt))
    assert len(res.pages) >= n and res.pages[0].length == pre.pool.page_nbytes
    resp = await pre.prefill(request("r1", prompt, res))
    assert resp.bytes_transferred == n * pre.pool.page_nbytes
    outbox = dec.outbox("r1")
    items = await drain(outbox)
    # Prefill's pool is fresh, so its pages were 0..n-1; compare with decode's bit for bit.
    sent = prompt_rows(pre.pool, range(n), len(prompt))
    arrived = prompt_rows(dec.pool, list(res.page_ids)[:n], len(prompt))
    assert all(torch.equal(a, b) for a, b in zip(sent, arrived))
    assert sum(t.numel() for t in sent) * 4 == len(prompt) * pre.layout.bytes_per_token
    assert all(isinstance(i, TokenEvent) for i in items) and len(items) == 5
    assert items[-1].finish_reason is FinishReason.LENGTH
    await async_wait_until(lambda: dec.pool.num_free == dec.pool.num_pages, 10)
    assert dec.requests.get("r1") is None and dec.requests.num_finished >= 1
    dec.pool.check_integrity()
    pre.pool.check_integrity()


async def test_checksum_mismatch_fails_closed_and_frees_pages(workers, tokenizer):
    pre, dec = workers
    prompt = list(range(100, 200))
    res = dec.reserve("r2", prompt, SamplingParams(max_tokens=4), asyncio.get_running_loop())
    outbox = dec.outbox("r2")
    await send_raw(pre, res, prompt, checksum_xor=1)
    items = await drain(outbox)
    assert len(items) == 1 and isinstance(items[0], RequestFailed)
    assert items[0].error.code == grpc.StatusCode.DATA_LOSS
    assert items[0].error.message == "KV transfer checksum mismatch"
    assert dec.pool.num_free == dec.pool.num_pages
    assert not dec.engine.running and dec.requests.get("r2") is None


async def test_missing_transfer_expires_and_late_notice_is_dropped(workers):
    pre, dec = workers
    prompt = list(range(10, 80))
    res = dec.reserve("r3", prompt, SamplingParams(max_tokens=4), asyncio.get_running_loop())
    outbox = dec.outbox("r3")
    items = await drain(outbox, until_s=5)  # lease is 1 s
    assert isinstance(items[0], RequestFailed)
    assert items[0].error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "lease" in items[0].error.message
    # The pages wait out the quarantine: a late WRITE may still be on its way.
    held = len(res.page_ids)
    q = dec.requests
    assert q.quarantined_pages == held and dec.pool.num_free == dec.pool.num_pages - held
    # The transfer lands after the lease (into quarantined pages): dropped, nothing decoded.
    await send_raw(pre, res, prompt)
    # lease 1 s + quarantine 0.5 s after the reservation, then the pages are free
    await async_wait_until(lambda: q.quarantined_pages == 0, 10)
    assert not dec.engine.running and dec.pool.num_free == dec.pool.num_pages


async def test_stale_epoch_notice_is_dropped(workers):
    pre, dec = workers
    prompt = list(range(10, 80))
    res = dec.reserve("r4", prompt, SamplingParams(max_tokens=4), asyncio.get_running_loop())
    before = dec.endpoint.num_notices
    await send_raw(pre, res, prompt, epoch=res.epoch - 1)
    # The notice arrived and was dropped: the request still waits for a valid transfer.
    await async_wait_until(lambda: dec.endpoint.num_notices > before, 10)
    req = dec.requests.get("r4")
    assert req is not None and req.state is DecodeState.RESERVED and not dec.engine.running
    assert dec.release("r4")
    assert dec.requests.quarantined_pages == len(res.page_ids)  # released before its KV landed
    await async_wait_until(lambda: dec.requests.quarantined_pages == 0, 10)
    assert dec.pool.num_free == dec.pool.num_pages


async def test_reservation_too_small_is_refused(workers):
    pre, dec = workers
    res = dec.reserve("r5", list(range(10)), SamplingParams(max_tokens=2),
                      asyncio.get_running_loop())
    pages = pre.pool.reserve(3)
    try:
        with pytest.raises(TransferError, match="reservation holds"):
            await pre.endpoint.write(pages, res, common_pb2.TransferNotice(request_id="r5"), 5)
    finally:
        pre.pool.release(pages)
        dec.release("r5")


async def test_a_warm_prefill_writes_its_fetched_pages_ahead_and_decode_gets_the_cold_kv(
        workers, tokenizer, tmp_path, monkeypatch):
    """A prompt's cached prefix fetched over NIXL from a real kvstore is WRITTEN to decode
    while the rest computes (one WRITE of the fetched pages without a notice, then one of the
    computed pages with it, whose checksum combines the fetched blocks' header checksums with
    the computed pages' digests): decode accepts it, and holds the cold request's KV bit for
    bit and decodes the same tokens."""
    from pdserve.cache.block_hash import cacheable_blocks
    from pdserve.services.transfer import NixlEndpoint
    from tests.helpers import start_shard

    pre, dec = workers
    shard = await start_shard(tmp_path / "s", staging_mb=64)
    client = KVStoreClient(shard.address, timeout_s=5.0)
    saved = pre.kvstore, pre.fetch_layer_groups, pre.fetch_nixl
    pre.kvstore, pre.fetch_layer_groups, pre.fetch_nixl = client, 4, True
    loop = asyncio.get_running_loop()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue? "
                                                                        * 20}])
    bt, n = pre.layout.block_tokens, pre.layout.pages_for(len(prompt))
    cached = cacheable_blocks(len(prompt), bt)
    assert cached >= 2 and n > cached
    try:
        with lease_of(dec, 30.0):
            res = dec.reserve("cold", prompt, SamplingParams(max_tokens=6), loop)
        cold = await pre.prefill(request("cold", prompt, res))
        cold_rows = prompt_rows(dec.pool, list(res.page_ids)[:n], len(prompt))
        cold_tokens = [i.token for i in await drain(dec.outbox("cold"))]
        await async_wait_until(lambda: shard.store.stats.num_blocks >= cached, 10)  # put_later

        writes: list[tuple[int, int, bool]] = []
        real = NixlEndpoint.write

        async def spy(self, pages, res, notice, timeout_s, first=0):
            writes.append((first, len(pages), notice is not None))
            return await real(self, pages, res, notice, timeout_s, first)

        monkeypatch.setattr(NixlEndpoint, "write", spy)
        with lease_of(dec, 30.0):
            res = dec.reserve("warm", prompt, SamplingParams(max_tokens=6), loop)
        req = request("warm", prompt, res)
        req.cached_blocks_hint = cached
        warm = await pre.prefill(req)
        assert warm.cached_tokens == cached * bt and warm.first_token == cold.first_token
        assert writes == [(0, cached, False), (cached, n - cached, True)]
        assert warm.bytes_transferred == n * pre.pool.page_nbytes
        warm_rows = prompt_rows(dec.pool, list(res.page_ids)[:n], len(prompt))
        assert all(torch.equal(a, b) for a, b in zip(cold_rows, warm_rows))
        assert [i.token for i in await drain(dec.outbox("warm"))] == cold_tokens
    finally:
        pre.kvstore, pre.fetch_layer_groups, pre.fetch_nixl = saved
        await pre.blocks.drain()
        await client.close()
        await shard.stop()
    await async_wait_until(lambda: dec.pool.num_free == dec.pool.num_pages, 10)


async def test_a_held_prompt_renews_its_lease_and_fails_at_once_when_the_reservation_is_gone(
        workers, tokenizer):
    """A prompt that waits in the prefill worker's queue longer than the decode reservation's
    lease (here the engine thread busy for 2.5 leases): with the decode worker's address the
    prefill worker renews the lease over gRPC (Decode.Renew) and the KV lands, decoding the
    same tokens as a prompt that did not wait; without it the lease ends first, no WRITE
    starts, and decode fails the request; and a reservation the decode worker no longer holds
    fails the request at the next renewal, before its prompt is computed."""
    import threading

    from pdserve.services.decode.servicer import DecodeServicer
    from pdserve.services.server import create_server
    from pdserve.v1 import decode_pb2_grpc

    pre, dec = workers  # the decode lease: 1 s
    server, port, _ = await create_server(
        [lambda s: decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(dec), s)], [],
        "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Count to ten. " * 9}])
    try:
        res = dec.reserve("quick", prompt, SamplingParams(max_tokens=5), loop)
        quick = await pre.prefill(request("quick", prompt, res, max_tokens=5))
        quick_tokens = [i.token for i in await drain(dec.outbox("quick"))]
        for renew in (True, False):
            rid = f"held-{renew}"
            res = dec.reserve(rid, prompt, SamplingParams(max_tokens=5), loop)
            outbox = dec.outbox(rid)
            busy = threading.Event()
            pre.thread.post(lambda busy=busy: busy.wait(10))  # the engine thread held
            loop.call_later(2.5, busy.set)
            req = request(rid, prompt, res, max_tokens=5)
            if renew:
                req.decode_address = f"127.0.0.1:{port}"
                held = await pre.prefill(req)
                assert busy.is_set()  # it did wait, 2.5 leases
                assert held.first_token == quick.first_token
                assert [i.token for i in await drain(outbox)] == quick_tokens
            else:
                with pytest.raises(TransferError, match="lease ended first"):
                    await pre.prefill(req)
                items = await drain(outbox)
                assert len(items) == 1 and isinstance(items[0], RequestFailed)
                assert items[0].error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # The decode worker lets the reservation go while the prompt waits (here: released, as
        # a restarted worker would hold nothing): the next renewal hears it, and the prefill
        # worker fails the request at once, while its engine thread is still busy, instead of
        # computing the prompt for nothing.
        res = dec.reserve("gone", prompt, SamplingParams(max_tokens=5), loop)
        busy = threading.Event()
        pre.thread.post(lambda: busy.wait(10))
        req = request("gone", prompt, res, max_tokens=5)
        req.decode_address = f"127.0.0.1:{port}"
        call = asyncio.create_task(pre.prefill(req))
        dec.release("gone")
        try:
            with pytest.raises(TransferError, match="no longer holds the reservation"):
                await asyncio.wait_for(call, 5)
            assert not busy.is_set()  # failed before the engine got to it
        finally:
            busy.set()
    finally:
        await server.stop(None)
    await async_wait_until(lambda: pre.pool.num_free == pre.pool.num_pages, 10)
    await async_wait_until(lambda: dec.pool.num_free == dec.pool.num_pages, 10)
    pre.pool.check_integrity()


async def test_a_prompt_takes_its_pages_only_when_its_turn_is_near(loaded, workers, tokenizer):
    """A prompt that arrives while a long one computes joins the engine's order at once but
    holds no pages until the long one has less than a step left (engine/scheduler.py: parked,
    then called); then it takes them, and decodes the same tokens as when it came alone."""
    from prometheus_client import CollectorRegistry

    from pdserve.metrics import PrefillMetrics
    from pdserve.services.decode.servicer import DecodeServicer
    from pdserve.services.server import create_server
    from pdserve.v1 import decode_pb2_grpc

    _, dec = workers  # its lease: 1 s, renewed over gRPC
    server, port, _ = await create_server(
        [lambda s: decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(dec), s)], [],
        "127.0.0.1", 0)
    pre = PrefillWorker(loaded, num_pages=24, kvstore=KVStoreClient("", 1.0),
                        agent_name="t-prefill-turns", chunk_tokens=64)
    registry = CollectorRegistry()
    pre.export_metrics(PrefillMetrics(registry))

    def parked_gauge():
        return registry.get_sample_value("pdserve_prefill_parked_requests")

    pre.start()
    loop = asyncio.get_running_loop()
    long_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the sea and its ships. " * 60}])
    short_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}])
    assert len(long_prompt) > 8 * 64

    async def prefill(rid, prompt):
        res = dec.reserve(rid, prompt, SamplingParams(max_tokens=4), loop)
        req = request(rid, prompt, res, max_tokens=4)
        req.decode_address = f"127.0.0.1:{port}"
        first = await pre.prefill(req)
        return first.first_token, [i.token for i in await drain(dec.outbox(rid))]

    def parked_short():
        return next((s for s in list(pre.engine.scheduler.waiting)
                     if s.request_id == "short" and s.parked and not s.called), None)

    try:
        alone = await prefill("alone", short_prompt)
        long_pages = pre.layout.pages_for(len(long_prompt))
        long_call = asyncio.create_task(prefill("long", long_prompt))
        await async_wait_until(lambda: pre.pool.num_free == pre.pool.num_pages - long_pages,
                               what="the long prompt took its pages")
        short_call = asyncio.create_task(prefill("short", short_prompt))
        short = await async_wait_until(parked_short, what="the short prompt in the order")
        # Behind the long one's chunks (more than a step of 64 tokens left), it holds nothing.
        assert pre.pool.num_free == pre.pool.num_pages - long_pages
        assert parked_gauge() == 1  # as a scrape reads it
        long_seq = next(s for s in list(pre.engine.scheduler.waiting) if s.request_id == "long")
        assert long_seq.started_at is not None and long_seq.prefill_left > 64
        assert await short_call == alone
        assert short.called and not short.parked and parked_gauge() == 0
        await long_call
    finally:
        await server.stop(None)
        await async_wait_until(lambda: pre.pool.num_free == pre.pool.num_pages, 10)
        pre.thread.stop()
    pre.pool.check_integrity()
