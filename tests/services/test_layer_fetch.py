"""Prefill overlaps the fetch of a prompt's cached blocks with the compute of its uncached part
(services/layer_fetch.py): blocks stream from real kvstore shards (gRPC on port 0) in layer
groups, and the real model's forward waits at each layer only for that layer's group."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest
import torch
from pdserve.cache.block_hash import block_hashes, cacheable_blocks
from pdserve.cache.codec import HEADER_SIZE, encode_block
from pdserve.cache.store import BlockStore
from pdserve.engine.sampling import SamplingParams
from pdserve.services.kvstore import KVStoreServicer
from pdserve.services.kvstore_client import KVStoreClient, rendezvous
from pdserve.services.layer_fetch import LayerLoad, layer_groups
from pdserve.services.prefill import PrefillWorker
from pdserve.services.server import create_server
from pdserve.services.staging import StagingArea
from pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc

from tests.services.test_sharding import start_shard

PROMPT = [1 + (i * 7919) % 40000 for i in range(700)]  # 10 cacheable blocks, then 60 tokens
_names = itertools.count()


_worker: list[PrefillWorker] = []


def worker(loaded, kvstore: KVStoreClient, groups: int, nixl: bool = False) -> PrefillWorker:
    """One prefill worker for the module (its pool and NIXL agent live as long as the test
    session), pointed at this test's store with this test's fetch settings."""
    if not _worker:
        _worker.append(PrefillWorker(loaded, num_pages=40, kvstore=kvstore,
                                     agent_name=f"layer-fetch-{next(_names)}"))
    w = _worker[0]
    assert w.pool.num_free == w.pool.num_pages, "a test before this one kept pages"
    w.kvstore, w.fetch_layer_groups, w.fetch_nixl = kvstore, groups, nixl
    return w


def damage(store: BlockStore, key: bytes) -> None:
    """Flips a byte 1,000 bytes before the end of the block on disk: in its last layers."""
    seg, off, size = store._meta[key].where()
    with open(store._segments.path(seg), "r+b") as f:
        f.seek(off + size - 1000)
        byte = f.read(1)
        f.seek(off + size - 1000)
        f.write(bytes([byte[0] ^ 0x20]))


def rows(pool, pages, n_tokens: int) -> torch.Tensor:
    bt = pool.layout.block_tokens
    return torch.cat([pool.kv[p, :, :min(bt, n_tokens - i * bt)].reshape(-1)
                      for i, p in enumerate(pages)])


async def cold_then_store(w: PrefillWorker) -> tuple[list[bytes], int, torch.Tensor]:
    """Computes the prompt from scratch, stores its blocks; returns keys, first token, KV."""
    bt = w.layout.block_tokens
    keys = block_hashes(w.namespace, "", PROMPT, bt)
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first, _ = await w._compute(PROMPT, pages, 0, SamplingParams())
    assert await w.kvstore.put(w._encode_blocks(pages, keys, 0)) == len(keys)
    kv = rows(w.pool, pages, len(PROMPT)).clone()
    w.pool.release(pages)
    return keys, first, kv


def test_layer_groups_cover_every_layer_once():
    assert layer_groups(30, 4) == [8, 15, 23, 30]
    assert layer_groups(3, 8) == [1, 2, 3]  # at most one group per layer
    assert layer_groups(30, 1) == [30]


async def test_layered_fetch_gives_the_bytes_and_token_of_loading_whole_blocks(loaded, tmp_path):
    shards = [await start_shard(tmp_path / f"s{i}") for i in range(2)]
    client = KVStoreClient(",".join(a for *_, a in shards), timeout_s=5.0)
    w = worker(loaded, client, groups=4)
    bt = w.layout.block_tokens
    keys, cold_first, cold_kv = await cold_then_store(w)
    want = cacheable_blocks(len(PROMPT), bt)
    assert want == 10 and len({rendezvous(k, client._names) for k in keys}) == 2  # both shards
    # Whole blocks, loaded before computing.
    p1 = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    n1 = w._load_blocks(p1, keys, await client.get(keys[:want]))
    first1, _ = await w._compute(PROMPT, p1, n1 * bt, SamplingParams())
    # The same blocks in 4 layer groups, computing as they arrive.
    p2 = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first2, _, n2, fetch_s = await w._compute_while_fetching(PROMPT, p2, keys[:want],
                                                              SamplingParams())
    assert n1 == n2 == want and fetch_s > 0
    assert first1 == first2
    # Bit-identical KV: the cached rows are the stored ones, the computed rows equal.
    assert torch.equal(rows(w.pool, p1, len(PROMPT)), rows(w.pool, p2, len(PROMPT)))
    assert torch.equal(rows(w.pool, p2, want * bt), cold_kv[:rows(w.pool, p2, want * bt).numel()])
    assert cold_first == first2  # (the cold run chunked differently; here the token agrees)
    w.pool.release(p1 + p2)
    await client.close()
    for server, store, _ in shards:
        assert store.stats.corrupt == 0
        await server.stop(0)


class GatedClient(KVStoreClient):
    """Holds back every part after the first until the test opens the gate."""

    def __init__(self, *a, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, **kw)
        self.gate = asyncio.Event()
        self.held = 0

    async def get_parts_from(self, shard, keys, cuts, on_part):  # type: ignore[no-untyped-def]
        held = []

        def keep(i, p, v):  # type: ignore[no-untyped-def]
            if p == 0:
                on_part(i, p, v)
            else:
                held.append((i, p, v))

        await super().get_parts_from(shard, keys, cuts, keep)
        self.held = len(held)
        await asyncio.wait_for(self.gate.wait(), 120)
        for item in held:
            on_part(*item)


async def test_uncached_part_computes_its_first_layers_before_the_rest_arrives(
        loaded, tmp_path, monkeypatch):
    """With only the first layer group of the cached blocks delivered, the forward runs those
    layers of the uncached tokens and then waits at the first layer of the next group; once
    the rest arrives it finishes with the same token as whole-block loading."""
    server, store, addr = await start_shard(tmp_path / "s")
    client = GatedClient(addr, timeout_s=5.0)
    w = worker(loaded, client, groups=3)
    bt = w.layout.block_tokens
    keys, cold_first, _ = await cold_then_store(w)
    want = cacheable_blocks(len(PROMPT), bt)
    ends = layer_groups(w.layout.num_layers, 3)
    loop = asyncio.get_running_loop()
    waited: list[tuple[int, int]] = []  # (layer, ready layers) at each wait on the engine thread
    real_wait = LayerLoad.wait

    def wait(self, layer):  # type: ignore[no-untyped-def]
        waited.append((layer, self.ready_layers))
        if layer >= max(self.ready_layers, 1):  # blocking for a later group: let it come
            loop.call_soon_threadsafe(client.gate.set)
        real_wait(self, layer)

    monkeypatch.setattr(LayerLoad, "wait", wait)
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first, _, n, _ = await w._compute_while_fetching(PROMPT, pages, keys[:want], SamplingParams())
    assert client.held == want * 2  # parts 1 and 2 of every block were held back
    # Layers 0 .. ends[0]-1 ran with only part 0 in place (the forward may have waited for it
    # at layer 0); the first wait that blocked after that was at the first layer of part 1.
    blocked = [layer for layer, ready in waited if layer >= ready and layer > 0]
    assert blocked[0] == ends[0]
    assert [layer for layer, _ in waited[:ends[0] + 1]] == list(range(ends[0] + 1))
    assert n == want and first == cold_first
    w.pool.release(pages)
    await client.close()
    await server.stop(0)


async def test_a_block_damaged_in_a_late_layer_is_recomputed_not_used(loaded, tmp_path):
    """The damage is in a part that arrives after the forward started with the earlier
    layers: the step's output is discarded, the prompt is computed from the damaged block,
    and the token is the one whole-block loading gives."""
    server, store, addr = await start_shard(tmp_path / "s")
    client = KVStoreClient(addr, timeout_s=5.0)
    w = worker(loaded, client, groups=4)
    bt = w.layout.block_tokens
    keys, _, _ = await cold_then_store(w)
    want = cacheable_blocks(len(PROMPT), bt)
    damage(store, keys[6])  # in the last of the 4 layer groups:
    assert w.layout.bytes_per_block - 1000 > w.layout.bytes_per_block * 3 // 4
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first, _, n, _ = await w._compute_while_fetching(PROMPT, pages, keys[:want], SamplingParams())
    assert n == 6  # blocks 0-5 used, block 6 on recomputed
    assert store.stats.corrupt == 1 and store.lookup(keys) == 6  # the store dropped it too
    # The same as computing from block 6 with blocks 0-5 loaded whole.
    p1 = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    assert w._load_blocks(p1, keys, await client.get(keys[:6])) == 6
    first1, _ = await w._compute(PROMPT, p1, 6 * bt, SamplingParams())
    assert first == first1
    assert torch.equal(rows(w.pool, p1, len(PROMPT)), rows(w.pool, pages, len(PROMPT)))
    w.pool.release(pages + p1)
    await client.close()
    await server.stop(0)


async def test_bad_part_cuts_are_refused_naming_the_field(tmp_path):
    server, store, addr = await start_shard(tmp_path / "s")
    keys = block_hashes("ns", "", list(range(64)), 64)
    store.put_many([(keys[0], encode_block(keys[0], "fp", 64, bytes(4096)))])
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        for cuts, why in (([0], "positive"), ([100, 50], "increasing"),
                          ([4096], "not inside"), (list(range(1, 2000)), "limit")):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.Get(kvstore_pb2.GetRequest(keys=keys, part_cuts=cuts)):
                    pass
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "part_cuts" in e.value.details() and why in e.value.details()
        got = [b async for b in stub.Get(kvstore_pb2.GetRequest(keys=keys, part_cuts=[1000]))]
        assert [(b.part, len(b.value)) for b in got] == [(0, HEADER_SIZE + 1000), (1, 3096)]
    await server.stop(0)


async def start_staging_shard(path, staging_mb: int, lease_s: float = 10.0):
    """A kvstore shard with a NIXL staging buffer, its agent polled as the service does."""
    store = BlockStore(path)
    staging = StagingArea(f"kvstore-test-{next(_names)}", staging_mb << 20, lease_s)
    servicer = KVStoreServicer(store, staging)
    server, port, _ = await create_server(
        [lambda s: kvstore_pb2_grpc.add_KVStoreServicer_to_server(servicer, s)], [],
        "127.0.0.1", 0)
    poller = asyncio.create_task(staging.poll())
    return server, store, staging, poller, f"127.0.0.1:{port}"


async def stop_staging_shard(server, staging, poller) -> None:  # type: ignore[no-untyped-def]
    poller.cancel()
    await server.stop(0)
    staging.close()


async def eventually(cond, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.mark.parametrize("staging_mb", [64, 4])
async def test_blocks_read_over_nixl_from_the_staging_buffer(loaded, tmp_path, monkeypatch,
                                                             staging_mb):
    """64 MiB holds the whole chain: every block is READ over NIXL in layer groups, nothing
    goes through the gRPC stream, and the staging space is released by the reader's
    notification. 4 MiB holds one block: that one over NIXL, the rest through the stream.
    Either way the bytes and the token are those of whole blocks loaded before computing."""
    server, store, staging, poller, addr = await start_staging_shard(tmp_path / "s", staging_mb)
    client = KVStoreClient(addr, timeout_s=5.0)
    w = worker(loaded, client, groups=4, nixl=True)
    bt = w.layout.block_tokens
    keys, _, _ = await cold_then_store(w)
    want = cacheable_blocks(len(PROMPT), bt)
    p1 = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    assert w._load_blocks(p1, keys, await client.get(keys[:want])) == want
    first1, _ = await w._compute(PROMPT, p1, want * bt, SamplingParams())
    streamed: list[int] = []
    real = KVStoreClient.get_parts_from

    async def count(self, shard, ks, cuts, on_part):  # type: ignore[no-untyped-def]
        streamed.append(len(ks))
        await real(self, shard, ks, cuts, on_part)

    monkeypatch.setattr(KVStoreClient, "get_parts_from", count)
    p2 = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first2, _, n2, _ = await w._compute_while_fetching(PROMPT, p2, keys[:want], SamplingParams())
    assert n2 == want and first2 == first1
    assert torch.equal(rows(w.pool, p1, len(PROMPT)), rows(w.pool, p2, len(PROMPT)))
    assert streamed == ([] if staging_mb == 64 else [want - 1])
    assert await eventually(lambda: staging.released == 1)
    assert staging.leased == 0 and staging.extents.free_bytes == staging_mb << 20
    w.pool.release(p1 + p2)
    await client.close()
    await stop_staging_shard(server, staging, poller)


async def test_a_store_without_staging_or_a_corrupt_block_falls_back_safely(loaded, tmp_path):
    """No staging buffer: Stage is UNIMPLEMENTED and the blocks come through the stream. A
    block damaged on disk: the store stops staging at it, the prompt is computed from it."""
    plain, plain_store, plain_addr = await start_shard(tmp_path / "plain")
    client = KVStoreClient(plain_addr, timeout_s=5.0)
    w = worker(loaded, client, groups=4, nixl=True)
    bt = w.layout.block_tokens
    keys, cold_first, _ = await cold_then_store(w)
    want = cacheable_blocks(len(PROMPT), bt)
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first, _, n, _ = await w._compute_while_fetching(PROMPT, pages, keys[:want], SamplingParams())
    assert n == want and first == cold_first
    w.pool.release(pages)
    await client.close()
    await plain.stop(0)

    server, store, staging, poller, addr = await start_staging_shard(tmp_path / "s", 64)
    w.kvstore = client = KVStoreClient(addr, timeout_s=5.0)
    await cold_then_store(w)
    damage(store, keys[6])
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first, _, n, _ = await w._compute_while_fetching(PROMPT, pages, keys[:want], SamplingParams())
    assert n == 6 and store.stats.corrupt == 1
    p1 = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    assert w._load_blocks(p1, keys, await client.get(keys[:6])) == 6
    first1, _ = await w._compute(PROMPT, p1, 6 * bt, SamplingParams())
    assert first == first1
    w.pool.release(pages + p1)
    await client.close()
    await stop_staging_shard(server, staging, poller)


async def test_staged_blocks_never_released_are_dropped_when_the_lease_ends(tmp_path):
    server, store, staging, poller, addr = await start_staging_shard(tmp_path / "s", 1, 0.2)
    keys = block_hashes("ns", "", list(range(128)), 64)
    store.put_many([(k, encode_block(k, "fp", 64, bytes(300_000))) for k in keys])
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        r = await stub.Stage(kvstore_pb2.StageRequest(keys=keys))
        assert len(r.blocks) == 2 and r.agent_name == staging.name and r.lease_s == 0.2
        assert [b.length for b in r.blocks] == [300_000, 300_000]
        assert staging.extents.free_bytes == (1 << 20) - 2 * (HEADER_SIZE + 300_000)
        # Full: the next request is refused, naming the way around.
        r2 = await stub.Stage(kvstore_pb2.StageRequest(keys=keys))
        assert len(r2.blocks) == 1  # one more fits
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Stage(kvstore_pb2.StageRequest(keys=keys))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Get" in e.value.details()
    assert await eventually(lambda: staging.expired == 2)
    assert staging.leased == 0 and staging.extents.free_bytes == 1 << 20
    await stop_staging_shard(server, staging, poller)


def test_a_store_that_cannot_stage_starts_without_staging(monkeypatch, caplog):
    from pdserve.services import kvstore, staging

    from pdserve.config import KVStoreSettings

    assert kvstore.open_staging(KVStoreSettings(nixl_staging_mb=0)) is None
    area = kvstore.open_staging(KVStoreSettings(nixl_staging_mb=1))
    assert area is not None and area.extents.free_bytes == 1 << 20
    area.close()

    def no_ucx(name):  # type: ignore[no-untyped-def]
        raise RuntimeError("no UCX transport")

    monkeypatch.setattr(staging, "new_agent", no_ucx)
    with caplog.at_level("WARNING"):
        assert kvstore.open_staging(KVStoreSettings(nixl_staging_mb=1)) is None
    assert "NIXL staging unavailable" in caplog.text


async def test_a_slow_fetch_holds_up_no_prompt_queued_with_it(loaded, tmp_path):
    """A prompt whose later layer groups are held back, queued with another that needs nothing
    from the store: the next step computes the other one to its first token without waiting;
    the held prompt finishes once its blocks come. (A prompt alone in the queue computes while
    its blocks arrive; a step that waits is bounded by the fetch deadline.)"""
    server, store, addr = await start_shard(tmp_path / "s")
    client = GatedClient(addr, timeout_s=30.0)
    w = worker(loaded, client, groups=3)
    keys, cold_first, _ = await cold_then_store(w)
    want = cacheable_blocks(len(PROMPT), w.layout.block_tokens)
    busy_prompt = [3 + i % 900 for i in range(1500)]  # keeps the engine busy meanwhile
    p0 = w.pool.reserve(w.layout.pages_for(len(busy_prompt)))
    busy = asyncio.create_task(w._compute(busy_prompt, p0, 0, SamplingParams()))
    await asyncio.sleep(0.1)
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    held = asyncio.create_task(
        w._compute_while_fetching(PROMPT, pages, keys[:want], SamplingParams()))
    other = [7 + i for i in range(100)]
    p2 = w.pool.reserve(w.layout.pages_for(len(other)))
    await asyncio.sleep(0)
    assert not busy.done(), "the engine was to be busy while both were queued"
    await asyncio.wait_for(w._compute(other, p2, 0, SamplingParams()), 120)
    assert not held.done() and not client.gate.is_set()
    client.gate.set()
    got, _, n, _ = await asyncio.wait_for(held, 120)
    assert n == want and got == cold_first
    await busy
    w.pool.release(p0 + pages + p2)
    await client.close()
    await server.stop(0)
