"""Pipelined prefill over several prefill workers (services/prefill/pipeline.py, head.py,
stage.py): real workers with the real model, stages served over gRPC on port 0, each stage's
KV READ by the head over NIXL; the result must be the KV and first token of one worker
computing the prompt alone."""

from __future__ import annotations

import asyncio
import itertools
import threading

import grpc
import pytest
import torch

from pdserve.cache.block_hash import block_hashes, cacheable_blocks
from pdserve.engine.sampling import SamplingParams
from pdserve.services.kvstore_client import KVStoreClient
from pdserve.services.prefill.pipeline import layer_split
from pdserve.services.prefill.servicer import PrefillServicer
from pdserve.services.prefill.worker import PrefillWorker
from pdserve.services.server import channel, create_server
from pdserve.v1 import prefill_pb2, prefill_pb2_grpc
from tests.helpers import async_wait_until, start_shard
from tests.helpers import kv_rows as rows

PROMPT = [1 + (i * 7919) % 40000 for i in range(700)]  # 10 cacheable blocks, then 60 tokens
_names = itertools.count()
_workers: list[tuple[PrefillWorker, object, str]] = []


async def serve(loaded, name: str) -> tuple[PrefillWorker, object, str]:
    """A prefill worker serving Prefill/PrefillStage on port 0 (prompt chunks of 256 tokens:
    3 chunks of PROMPT)."""
    w = PrefillWorker(loaded, num_pages=24, kvstore=KVStoreClient("", 1.0), chunk_tokens=256,
                      agent_name=f"{name}-{next(_names)}")
    w.start()
    servicer = PrefillServicer(w)
    server, port, _ = await create_server(
        [lambda s, sv=servicer: prefill_pb2_grpc.add_PrefillServicer_to_server(sv, s)], [],
        "127.0.0.1", 0)
    return w, server, f"127.0.0.1:{port}"


async def workers(loaded, n: int = 3) -> list[tuple[PrefillWorker, object, str]]:
    """n prefill workers for the module, each serving Prefill/PrefillStage on port 0; the
    first is the head in these tests. Prompt chunks of 256 tokens: 3 chunks of PROMPT."""
    while len(_workers) < n:
        _workers.append(await serve(loaded, "pipeline"))
    for w, _, _ in _workers:
        assert w.pool.num_free == w.pool.num_pages, "a test before this one kept pages"
        w.head.num_pipelined = w.head.num_fallbacks = w.stage.num_served = 0
    return _workers[:n]


def request(peers, salt: str = "") -> prefill_pb2.PrefillRequest:
    return prefill_pb2.PrefillRequest(
        request_id="r1", prompt_token_ids=PROMPT, cache_salt=salt,
        pipeline=[prefill_pb2.PipelinePeer(worker_id=f"p{i}", address=a)
                  for i, a in enumerate(peers)])


async def alone(w: PrefillWorker) -> tuple[int, torch.Tensor]:
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first = (await w.compute_prompt(f"alone-{next(_names)}", PROMPT, pages)).token
    kv = rows(w.pool, pages, len(PROMPT)).clone()
    w.pool.release(pages)
    return first, kv


def test_layer_split_is_even_and_covers_every_layer():
    assert layer_split(30, 1) == [30]
    assert layer_split(30, 3) == [10, 20, 30]
    assert layer_split(30, 4) == [8, 16, 23, 30]
    with pytest.raises(ValueError):
        layer_split(3, 4)


@pytest.mark.parametrize("stages", [2, 3])
async def test_pipelined_prefill_gives_the_kv_and_token_of_one_worker(loaded, stages):
    ws = await workers(loaded)
    head = ws[0][0]
    ref_first, ref_kv = await alone(head)
    pages = head.pool.reserve(head.layout.pages_for(len(PROMPT)))
    first = (await head.head.prefill(request([a for _, _, a in ws[1:stages]]), PROMPT,
                                     pages, 0, SamplingParams())).token
    kv = rows(head.pool, pages, len(PROMPT))
    head.pool.release(pages)
    assert head.head.num_pipelined == 1 and head.head.num_fallbacks == 0
    assert [w.stage.num_served for w, _, _ in ws[1:stages]] == [1] * (stages - 1)
    assert first == ref_first
    # Every layer's KV, the stages' layers READ over NIXL: the same computation, chunked the
    # same way (256 tokens), so the same bytes.
    assert torch.equal(kv, ref_kv)
    for w, _, _ in ws:  # the stages freed their pages once the head had READ them
        await async_wait_until(lambda w=w: w.pool.num_free == w.pool.num_pages, 10)


async def test_a_float16_kv_cache_is_pipelined_as_it_is_computed_alone(loaded):
    """Workers whose KV pool is float16 (--kv-dtype float16) over a float32 model: the hidden
    states between stages stay float32 (the model's), and the head's KV and first token are
    those of one such worker alone."""
    from dataclasses import replace

    half_ = replace(loaded, layout=replace(loaded.layout, dtype="float16"))
    ws = [await serve(half_, "pipeline-f16") for _ in range(2)]
    try:
        head = ws[0][0]
        assert head.pool.kv.dtype == torch.float16
        ref_first, ref_kv = await alone(head)
        pages = head.pool.reserve(head.layout.pages_for(len(PROMPT)))
        first = (await head.head.prefill(request([ws[1][2]]), PROMPT, pages, 0,
                                         SamplingParams())).token
        kv = rows(head.pool, pages, len(PROMPT))
        head.pool.release(pages)
        assert head.head.num_pipelined == 1 and head.head.num_fallbacks == 0
        assert first == ref_first and torch.equal(kv, ref_kv)
    finally:
        for w, server, _ in ws:
            await server.stop(0)
            w.thread.stop()


async def test_stages_load_the_cached_blocks_and_only_new_pages_move(loaded, tmp_path):
    shard = await start_shard(tmp_path / "s")
    client = KVStoreClient(shard.address, timeout_s=5.0)
    ws = await workers(loaded)
    head = ws[0][0]
    for w, _, _ in ws:
        w.kvstore = client
    bt = head.layout.block_tokens
    keys = block_hashes(head.namespace, "", PROMPT, bt)
    ref_first, ref_kv = await alone(head)
    pages = head.pool.reserve(head.layout.pages_for(len(PROMPT)))
    await head.compute_prompt("cold", PROMPT, pages)
    assert await client.put(await head.blocks.encode(keys, pages, 0)) == len(keys)
    head.pool.release(pages)
    want = cacheable_blocks(len(PROMPT), bt)
    pages = head.pool.reserve(head.layout.pages_for(len(PROMPT)))
    n = await head.blocks.load(keys[:want], pages)
    assert n == want == 10
    first = (await head.head.prefill(request([a for _, _, a in ws[1:]]), PROMPT, pages,
                                     n, SamplingParams())).token
    assert head.head.num_pipelined == 1 and first == ref_first
    # The cached rows are the stored ones; the 60 computed rows are close to the cold run's
    # (which computed them after 640 computed, not loaded, rows: the same values here).
    kv = rows(head.pool, pages, len(PROMPT))
    torch.testing.assert_close(kv, ref_kv, rtol=0, atol=0)
    head.pool.release(pages)
    for w, _, _ in ws:
        w.kvstore = KVStoreClient("", 1.0)
        await async_wait_until(lambda w=w: w.pool.num_free == w.pool.num_pages, 10)
    await client.close()
    await shard.stop()


async def test_a_stage_missing_cached_blocks_or_gone_costs_only_time(loaded, tmp_path):
    ws = await workers(loaded)
    head = ws[0][0]
    ref_first, ref_kv = await alone(head)
    # A stage that is not there.
    pages = head.pool.reserve(head.layout.pages_for(len(PROMPT)))
    first = (await head.head.prefill(request(["127.0.0.1:1"]), PROMPT, pages, 0,
                                     SamplingParams())).token
    assert head.head.num_fallbacks == 1 and first == ref_first
    assert torch.equal(rows(head.pool, pages, len(PROMPT)), ref_kv)
    head.pool.release(pages)
    # A stage told blocks are cached that its (empty) store does not hold: FAILED_PRECONDITION,
    # and the head computes the prompt alone from its own cached blocks (none here).
    shard = await start_shard(tmp_path / "empty")
    ws[1][0].kvstore = KVStoreClient(shard.address, timeout_s=2.0)
    pages = head.pool.reserve(head.layout.pages_for(len(PROMPT)))
    call = prefill_pb2_grpc.PrefillStub(channel(ws[1][2])).PrefillStage()
    await call.write(prefill_pb2.PipelineStageRequest(
        request_id="r2", prompt_token_ids=PROMPT, cached_blocks=3, layer_begin=0,
        layer_end=layer_split(30, 2)[0], chunk_tokens=256))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call.read()
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cached_blocks" in e.value.details()
    head.pool.release(pages)
    await ws[1][0].kvstore.close()
    ws[1][0].kvstore = KVStoreClient("", 1.0)
    await shard.stop()
    for w, _, _ in ws:
        await async_wait_until(lambda w=w: w.pool.num_free == w.pool.num_pages, 10)


async def test_a_stage_that_waits_longer_than_the_timeout_keeps_its_pipeline(loaded):
    """A stage whose worker is busy for longer than the transfer timeout (its engine thread
    held, as by a long step, or a prompt queued behind others or deferred) sends StageWaiting
    every third of the timeout: the head keeps the pipeline and gets the same KV and token
    as one worker alone, instead of timing out and computing the prompt itself."""
    ws = await workers(loaded, 2)
    head, stage = ws[0][0], ws[1][0]
    ref_first, ref_kv = await alone(head)
    head.head.timeout_s = stage.stage.timeout_s = 1.0
    busy = threading.Event()
    stage.thread.post(lambda: busy.wait(10))  # the stage's engine thread busy until set
    asyncio.get_running_loop().call_later(2.5, busy.set)  # 2.5 timeouts
    try:
        pages = head.pool.reserve(head.layout.pages_for(len(PROMPT)))
        first = (await head.head.prefill(request([ws[1][2]]), PROMPT, pages, 0,
                                         SamplingParams())).token
        kv = rows(head.pool, pages, len(PROMPT))
        head.pool.release(pages)
        assert busy.is_set()  # it did wait
        assert head.head.num_pipelined == 1 and head.head.num_fallbacks == 0
        assert first == ref_first and torch.equal(kv, ref_kv)
    finally:
        busy.set()
        head.head.timeout_s = stage.stage.timeout_s = 30.0
    for w, _, _ in ws:
        await async_wait_until(lambda w=w: w.pool.num_free == w.pool.num_pages, 10)


async def test_a_stage_never_released_frees_its_pages_after_the_timeout(loaded):
    ws = await workers(loaded)
    stage = ws[1][0]
    stage.stage.timeout_s = 1.0
    call = prefill_pb2_grpc.PrefillStub(channel(ws[1][2])).PrefillStage()
    try:
        await call.write(prefill_pb2.PipelineStageRequest(
            request_id="held", prompt_token_ids=PROMPT, layer_begin=0, layer_end=15,
            chunk_tokens=256))
        kinds = []
        while not kinds or kinds[-1] != "kv":
            kinds.append((await call.read()).WhichOneof("kind"))
        # A chunk slower than a third of the timeout is announced by a "waiting" message
        # (a slow machine): the stage is there, and the order of what it sends is the same.
        assert [k for k in kinds if k != "waiting"] == ["hidden"] * 3 + ["kv"]
        assert stage.pool.num_free < stage.pool.num_pages  # held for the caller's READ
        # The caller neither READs nor closes: after the timeout the stage lets go.
        assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
        await async_wait_until(lambda: stage.pool.num_free == stage.pool.num_pages, 10)
    finally:
        call.cancel()  # (a failure above leaves the call open: the stage must still let go)
        await async_wait_until(lambda: stage.pool.num_free == stage.pool.num_pages, 10)
        stage.stage.timeout_s = 30.0


@pytest.mark.parametrize("change, field", [
    (dict(layer_begin=0, layer_end=30), "layer_begin, layer_end"),
    (dict(layer_begin=5, layer_end=3), "layer_begin, layer_end"),
    (dict(chunk_tokens=0), "chunk_tokens"),
    (dict(cached_blocks=11), "cached_blocks"),
    (dict(layer_begin=4), "upstream_layers"),
    (dict(prompt_token_ids=[10 ** 9]), "prompt_token_ids"),
])
async def test_bad_stage_requests_are_refused_naming_the_field(loaded, change, field):
    ws = await workers(loaded)
    fields = dict(request_id="bad", prompt_token_ids=PROMPT, layer_begin=0, layer_end=15,
                  chunk_tokens=256)
    fields.update(change)
    call = prefill_pb2_grpc.PrefillStub(channel(ws[1][2])).PrefillStage()
    await call.write(prefill_pb2.PipelineStageRequest(**fields))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call.read()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field)
    assert ws[1][0].pool.num_free == ws[1][0].pool.num_pages


@pytest.fixture(scope="module", autouse=True)
async def _stop_servers():
    yield
    for w, server, _ in _workers:
        await server.stop(0)
        w.thread.stop()
    _workers.clear()
