"""Prefill overlaps the fetch of a prompt's cached blocks with the compute of its uncached part
(services/prefill/layer_fetch.py): blocks stream from real kvstore shards (gRPC on port 0) in
layer groups, and the real model's forward waits at each layer only for that layer's group."""

from __future__ import annotations

import asyncio
import itertools
import threading

import grpc
import pytest
import torch

from pdserve.cache.block_hash import BlockHash, block_hashes, cacheable_blocks
from pdserve.cache.codec import HEADER_SIZE, encode_block
from pdserve.cache.store import BlockStore
from pdserve.services.kvstore_client import KVStoreClient, rendezvous
from pdserve.services.prefill import layer_fetch
from pdserve.services.prefill.layer_fetch import (
    STAGE_CHUNK_BLOCKS,
    STAGE_CHUNK_BLOCKS_LAYERED,
    LayerLoad,
    layer_groups,
)
from pdserve.services.prefill.worker import PrefillWorker
from pdserve.services.transfer import ReadLane
from pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc
from tests.helpers import async_wait_until, start_shard
from tests.helpers import kv_rows as rows

PROMPT = [1 + (i * 7919) % 40000 for i in range(700)]  # 10 cacheable blocks, then 60 tokens
_ids = itertools.count()
_worker: list[PrefillWorker] = []


_lanes: list[ReadLane] = []


def worker(loaded, kvstore: KVStoreClient, groups: int, nixl: bool = False,
           lanes: int = 2) -> PrefillWorker:
    """One prefill worker for the module (its pool, NIXL agent and two read lanes live as long
    as the test session), pointed at this test's store with this test's fetch settings: READs
    on `lanes` of its read lanes (0: on its own agent)."""
    if not _worker:
        w = PrefillWorker(loaded, num_pages=40, kvstore=kvstore, agent_name="layer-fetch",
                          fetch_nixl=True, read_lanes=2)
        w.start()
        _worker.append(w)
        _lanes.extend(w.endpoint.lanes)
    w = _worker[0]
    assert w.pool.num_free == w.pool.num_pages, "a test before this one kept pages"
    w.kvstore, w.fetch_layer_groups, w.fetch_nixl = kvstore, groups, nixl
    w.endpoint.lanes = _lanes[:lanes]
    return w


def reads(w: PrefillWorker) -> tuple[int, list[int]]:
    """READs landed on the worker's own agent, and on each of its read lanes."""
    return w.endpoint.reads, [lane.endpoint.reads if lane.endpoint else 0 for lane in _lanes]


@pytest.fixture(scope="module", autouse=True)
def _stop_worker():
    yield
    for w in _worker:
        w.thread.stop()
    _worker.clear()


def rid() -> str:
    return f"r{next(_ids)}"


async def compute(w: PrefillWorker, prompt: list[int], pages, start: int = 0) -> int:
    """The first token of the prompt computed into the pages from `start`."""
    return (await w.compute_prompt(rid(), prompt, pages, start)).token


async def fetch_and_compute(w: PrefillWorker, pages, keys) -> tuple[int, int, float]:
    first, n, fetch_s = await w.compute_while_fetching(rid(), PROMPT, pages, keys)
    return first.token, n, fetch_s


def damage(store: BlockStore, key: BlockHash) -> None:
    """Flips a byte 1,000 bytes before the end of the block on disk: in its last layers."""
    where = store.location(key)
    assert where is not None
    with open(where.path, "r+b") as f:
        f.seek(where.offset + where.length - 1000)
        byte = f.read(1)
        f.seek(where.offset + where.length - 1000)
        f.write(bytes([byte[0] ^ 0x20]))


async def cold_then_store(w: PrefillWorker) -> tuple[list[BlockHash], int, torch.Tensor]:
    """Computes the prompt from scratch, stores its blocks; returns keys, first token, KV."""
    bt = w.layout.block_tokens
    keys = block_hashes(w.namespace, "", PROMPT, bt)
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first = await compute(w, PROMPT, pages)
    assert await w.kvstore.put(await w.blocks.encode(keys, pages, 0)) == len(keys)
    kv = rows(w.pool, pages, len(PROMPT)).clone()
    w.pool.release(pages)
    return keys, first, kv


def test_layer_groups_cover_every_layer_once():
    assert layer_groups(30, 4) == [8, 15, 23, 30]
    assert layer_groups(3, 8) == [1, 2, 3]  # at most one group per layer
    assert layer_groups(30, 1) == [30]


async def spread_shards(loaded, tmp_path, n: int = 2) -> tuple[list, KVStoreClient]:
    """`n` shards on port 0 over which the prompt's blocks land on every shard (placement
    hashes the shard addresses: with 10 blocks over 2 shards, 1 start in 512 puts them all
    on one; start again then)."""
    from pdserve.cache.block_hash import hash_namespace

    ns = hash_namespace(loaded.model_id, loaded.layout.fingerprint())
    keys = block_hashes(ns, "", PROMPT, loaded.layout.block_tokens)
    for attempt in range(5):
        shards = [await start_shard(tmp_path / f"s{attempt}-{i}") for i in range(n)]
        client = KVStoreClient(",".join(s.address for s in shards), timeout_s=5.0)
        if len({rendezvous(k, client.shard_names) for k in keys}) == n:
            return shards, client
        await client.close()
        for s in shards:
            await s.stop()
    raise AssertionError("5 starts of the shards put every block on one shard")


async def test_layered_fetch_gives_the_bytes_and_token_of_loading_whole_blocks(loaded, tmp_path):
    shards, client = await spread_shards(loaded, tmp_path)
    w = worker(loaded, client, groups=4)
    bt = w.layout.block_tokens
    keys, cold_first, cold_kv = await cold_then_store(w)
    want = cacheable_blocks(len(PROMPT), bt)
    assert want == 10 and len({rendezvous(k, client.shard_names) for k in keys}) == 2
    # Whole blocks, loaded before computing.
    p1 = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    n1 = await w.blocks.load(keys[:want], p1)
    first1 = await compute(w, PROMPT, p1, n1 * bt)
    # The same blocks in 4 layer groups, computing as they arrive.
    p2 = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first2, n2, fetch_s = await fetch_and_compute(w, p2, keys[:want])
    assert n1 == n2 == want and fetch_s > 0
    assert first1 == first2
    # Bit-identical KV: the cached rows are the stored ones, the computed rows equal.
    assert torch.equal(rows(w.pool, p1, len(PROMPT)), rows(w.pool, p2, len(PROMPT)))
    assert torch.equal(rows(w.pool, p2, want * bt), cold_kv[:rows(w.pool, p2, want * bt).numel()])
    assert cold_first == first2  # (the cold run chunked differently; here the token agrees)
    w.pool.release(p1 + p2)
    await client.close()
    for shard in shards:
        assert shard.store.stats.corrupt == 0
        await shard.stop()


class GatedClient(KVStoreClient):
    """Holds back every part after the first until the test opens the gate."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.gate = asyncio.Event()
        self.held = 0

    async def get_parts_from(self, shard, keys, cuts, on_part):
        held = []

        def keep(i, p, v):
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
    shard = await start_shard(tmp_path / "s")
    client = GatedClient(shard.address, timeout_s=5.0)
    w = worker(loaded, client, groups=3)
    bt = w.layout.block_tokens
    keys, cold_first, _ = await cold_then_store(w)
    want = cacheable_blocks(len(PROMPT), bt)
    ends = layer_groups(w.layout.num_layers, 3)
    loop = asyncio.get_running_loop()
    waited: list[tuple[int, int]] = []  # (layer, ready layers) at each wait on the engine thread
    real_wait = LayerLoad.wait

    def wait(self, layer):
        waited.append((layer, self.ready_layers))
        if layer >= max(self.ready_layers, 1):  # blocking for a later group: let it come
            loop.call_soon_threadsafe(client.gate.set)
        real_wait(self, layer)

    monkeypatch.setattr(LayerLoad, "wait", wait)
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first, n, _ = await fetch_and_compute(w, pages, keys[:want])
    assert client.held == want * 2  # parts 1 and 2 of every block were held back
    # Layers 0 .. ends[0]-1 ran with only part 0 in place (the forward may have waited for it
    # at layer 0); the first wait that blocked after that was at the first layer of part 1.
    blocked = [layer for layer, ready in waited if layer >= ready and layer > 0]
    assert blocked[0] == ends[0]
    assert [layer for layer, _ in waited[:ends[0] + 1]] == list(range(ends[0] + 1))
    assert n == want and first == cold_first
    w.pool.release(pages)
    await client.close()
    await shard.stop()


async def test_a_block_damaged_in_a_late_layer_is_recomputed_not_used(loaded, tmp_path):
    """The damage is in a part that arrives after the forward started with the earlier
    layers: the step's output is discarded, the prompt is computed from the damaged block,
    and the token is the one whole-block loading gives."""
    shard = await start_shard(tmp_path / "s")
    store = shard.store
    client = KVStoreClient(shard.address, timeout_s=5.0)
    w = worker(loaded, client, groups=4)
    bt = w.layout.block_tokens
    keys, _, _ = await cold_then_store(w)
    want = cacheable_blocks(len(PROMPT), bt)
    damage(store, keys[6])  # in the last of the 4 layer groups:
    assert w.layout.bytes_per_block - 1000 > w.layout.bytes_per_block * 3 // 4
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first, n, _ = await fetch_and_compute(w, pages, keys[:want])
    assert n == 6  # blocks 0-5 used, block 6 on recomputed
    assert store.stats.corrupt == 1 and store.lookup(keys) == 6  # the store dropped it too
    # The same as computing from block 6 with blocks 0-5 loaded whole.
    p1 = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    assert await w.blocks.load(keys[:6], p1) == 6
    first1 = await compute(w, PROMPT, p1, 6 * bt)
    assert first == first1
    assert torch.equal(rows(w.pool, p1, len(PROMPT)), rows(w.pool, pages, len(PROMPT)))
    w.pool.release(pages + p1)
    await client.close()
    await shard.stop()


async def test_bad_part_cuts_are_refused_naming_the_field(tmp_path):
    shard = await start_shard(tmp_path / "s")
    keys = block_hashes("ns", "", list(range(64)), 64)
    shard.store.put_many([(keys[0], encode_block(keys[0], "fp", 64, bytes(4096)))])
    async with grpc.aio.insecure_channel(shard.address) as ch:
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
    await shard.stop()


@pytest.mark.parametrize(("staging_mb", "groups", "in_place", "lanes"), [
    (64, 4, True, 2), (64, 1, True, 2), (64, 4, False, 2), (4, 4, False, 2), (64, 1, False, 2),
    (64, 4, True, 0), (64, 1, True, 0)])
async def test_blocks_read_over_nixl_from_the_staging_buffer(loaded, tmp_path, monkeypatch,
                                                             staging_mb, groups, in_place,
                                                             lanes):
    """In place (the default): the store maps the blocks' segment files and every block is
    READ over NIXL where it lies, the buffer unused. Copied: 64 MiB holds the whole chain:
    every block is READ over NIXL (in 4 layer groups: one Stage of all 10 blocks; whole
    blocks: Stage calls of STAGE_CHUNK_BLOCKS, 8 + 2, the second staged while the first is
    READ), nothing goes through the gRPC stream, and each staged chunk's space is released by
    the reader's notification. 4 MiB holds one block: that one over NIXL, the rest through
    the stream, the space released. Every way the bytes and the token are those of whole
    blocks loaded before computing. The READs are shared out among the worker's two read
    lanes (all of whole blocks, group 0 of layer groups; a READ of one block goes to one
    lane), or made by its own agent (no lanes)."""
    shard = await start_shard(tmp_path / "s", staging_mb=staging_mb, map_segments=in_place)
    staging = shard.staging
    client = KVStoreClient(shard.address, timeout_s=5.0)
    w = worker(loaded, client, groups=groups, nixl=True, lanes=lanes)
    bt = w.layout.block_tokens
    keys, _, _ = await cold_then_store(w)
    want = cacheable_blocks(len(PROMPT), bt)
    p1 = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    assert await w.blocks.load(keys[:want], p1) == want
    first1 = await compute(w, PROMPT, p1, want * bt)
    streamed: list[int] = []
    real = KVStoreClient.get_parts_from

    async def count(self, shard, ks, cuts, on_part):
        streamed.append(len(ks))
        await real(self, shard, ks, cuts, on_part)

    monkeypatch.setattr(KVStoreClient, "get_parts_from", count)
    p2 = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    own0, lanes0 = reads(w)
    first2, n2, _ = await fetch_and_compute(w, p2, keys[:want])
    assert n2 == want and first2 == first1
    own1, lanes1 = reads(w)
    # READs: one per group of each chunk staged (one chunk in layer groups, two of whole
    # blocks), made by the agent, or by each lane that has a share of the chunk's blocks (the
    # one block staged in 4 MiB: the second lane's share) in group 0, and by the first lane
    # in later groups (READ while the forward computes).
    chunk_reads = (1 if groups > 1 else 2) * groups
    per_lane = ([groups - 1, 1] if staging_mb == 4 else [groups, 1] if groups > 1
                else [chunk_reads] * 2)
    assert (own1 - own0, [b - a for a, b in zip(lanes0, lanes1)]) == (
        (0, per_lane) if lanes else (chunk_reads, [0, 0]))
    assert torch.equal(rows(w.pool, p1, len(PROMPT)), rows(w.pool, p2, len(PROMPT)))
    assert streamed == ([] if staging_mb == 64 else [want - 1])
    assert STAGE_CHUNK_BLOCKS == 8 and STAGE_CHUNK_BLOCKS_LAYERED >= want
    await async_wait_until(lambda: staging.released == (2 if groups == 1 else 1), 10)
    assert staging.leased == 0 and staging.extents.free_bytes == staging_mb << 20
    assert (staging.mapped_blocks, staging.staged_blocks) == ((want, 0) if in_place else
                                                               (0, min(want, staging_mb // 3)))
    w.pool.release(p1 + p2)
    await client.close()
    await shard.stop()


@pytest.mark.parametrize("groups", [4, 1])
async def test_a_store_without_staging_or_a_corrupt_block_falls_back_safely(loaded, tmp_path,
                                                                            groups):
    """No staging buffer: Stage is UNIMPLEMENTED and the blocks come through the stream. A
    block damaged on disk: the store stages it (headers checked, payloads not), the reader's
    checksum stops at it, the prompt is computed from it, and the release names it: the
    store verifies it and deletes it. In layer groups, and in whole blocks, whose hashes run
    in a helper thread while the next chunk (blocks 8 and 9) is READ."""
    plain = await start_shard(tmp_path / "plain")
    client = KVStoreClient(plain.address, timeout_s=5.0)
    w = worker(loaded, client, groups=groups, nixl=True)
    bt = w.layout.block_tokens
    keys, cold_first, _ = await cold_then_store(w)
    want = cacheable_blocks(len(PROMPT), bt)
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first, n, _ = await fetch_and_compute(w, pages, keys[:want])
    assert n == want and first == cold_first
    w.pool.release(pages)
    await client.close()
    await plain.stop()

    shard = await start_shard(tmp_path / "s", staging_mb=64)
    store = shard.store
    w.kvstore = client = KVStoreClient(shard.address, timeout_s=5.0)
    await cold_then_store(w)
    damage(store, keys[6])
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    first, n, _ = await fetch_and_compute(w, pages, keys[:want])
    assert n == 6
    await async_wait_until(lambda: store.stats.corrupt == 1, 10)
    assert shard.staging.mismatched == 1 and store.lookup(keys) == 6  # deleted, counted once
    p1 = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    assert await w.blocks.load(keys[:6], p1) == 6
    first1 = await compute(w, PROMPT, p1, 6 * bt)
    assert first == first1
    w.pool.release(pages + p1)
    await client.close()
    await shard.stop()


async def test_staged_blocks_never_released_are_dropped_when_the_lease_ends(tmp_path):
    shard = await start_shard(tmp_path / "s", staging_mb=1, lease_s=1.0, map_segments=False)
    staging = shard.staging
    keys = block_hashes("ns", "", list(range(128)), 64)
    shard.store.put_many([(k, encode_block(k, "fp", 64, bytes(300_000))) for k in keys])
    async with grpc.aio.insecure_channel(shard.address) as ch:
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        r = await stub.Stage(kvstore_pb2.StageRequest(keys=keys))
        assert len(r.blocks) == 2 and r.agent_name == staging.name and r.lease_s == 1.0
        assert [b.length for b in r.blocks] == [300_000, 300_000]
        assert staging.extents.free_bytes == (1 << 20) - 2 * (HEADER_SIZE + 300_000)
        # Full: the next request is refused, naming the way around.
        r2 = await stub.Stage(kvstore_pb2.StageRequest(keys=keys))
        assert len(r2.blocks) == 1  # one more fits
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Stage(kvstore_pb2.StageRequest(keys=keys))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Get" in e.value.details()
    await async_wait_until(lambda: staging.expired == 2, 10)
    assert staging.leased == 0 and staging.extents.free_bytes == 1 << 20
    await shard.stop()


async def test_blocks_staged_in_place_lie_in_mapped_segment_files(tmp_path, monkeypatch):
    """In place: a Stage answers addresses inside the mapped segment file (the payloads are
    there, byte for byte) and the metadata of that mapping, and copies nothing into the
    buffer. The segment being written grows into its mapping (mapped at the segment size): new
    blocks need no new region. A block that does not fit starts a new segment, a new region.
    Past the mapped-file bound the least recent mapping goes, kept while a lease holds blocks
    in it and closed when the lease ends; the answers count the closed mappings (readers then
    forget the store's old regions)."""
    import ctypes

    from pdserve.services.kvstore import staging as staging_module

    monkeypatch.setattr(staging_module, "MAX_MAPPED_SEGMENTS", 1)
    shard = await start_shard(tmp_path / "s", staging_mb=1, lease_s=1.0,
                              segment_bytes=1_000_000)
    staging = shard.staging
    keys = block_hashes("ns", "", list(range(512)), 64)
    payloads = [bytes([i]) * 300_000 for i in range(6)]

    def put(lo: int, hi: int) -> None:
        shard.store.put_many([(k, encode_block(k, "fp", 64, p))
                              for k, p in zip(keys[lo:hi], payloads[lo:hi])])

    put(0, 2)
    async with grpc.aio.insecure_channel(shard.address) as ch:
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        r = await stub.Stage(kvstore_pb2.StageRequest(keys=keys[:2]))
        assert [b.length for b in r.blocks] == [300_000, 300_000] and len(r.region_metadata) == 1
        for b, p in zip(r.blocks, payloads):
            assert ctypes.string_at(b.addr, b.length) == p
        assert staging.extents.free_bytes == 1 << 20 and staging.mapped_blocks == 2
        assert staging.mapped_segments == 1 and r.regions_closed == 0
        # The segment being written grows within its mapping: the same region.
        put(2, 3)
        r2 = await stub.Stage(kvstore_pb2.StageRequest(keys=keys[:3]))
        assert len(r2.blocks) == 3 and r2.region_metadata == r.region_metadata
        assert [ctypes.string_at(b.addr, b.length) for b in r2.blocks] == payloads[:3]
        assert staging.mapped_segments == 1 and r2.regions_closed == 0
        # A fourth block would take the segment past 1,000,000 bytes: it starts a new segment,
        # mapped as a second region; the first mapping (leased) stays past the bound of 1.
        put(3, 4)
        assert shard.store.location(keys[3]).path != shard.store.location(keys[0]).path
        r3 = await stub.Stage(kvstore_pb2.StageRequest(keys=keys[:4]))
        assert len(r3.blocks) == 4 and len(r3.region_metadata) == 2
        assert [ctypes.string_at(b.addr, b.length) for b in r3.blocks] == payloads[:4]
        assert staging.mapped_segments == 2 and r3.regions_closed == 0
    await async_wait_until(lambda: staging.expired == 3, 10)
    assert staging.leased == 0 and staging.mapped_segments == 1 and staging.closed == 1
    async with grpc.aio.insecure_channel(shard.address) as ch:
        r4 = await kvstore_pb2_grpc.KVStoreStub(ch).Stage(
            kvstore_pb2.StageRequest(keys=keys[3:4]))
        assert len(r4.blocks) == 1 and r4.regions_closed == 1
    await shard.stop()


async def test_a_cancelled_fetch_ends_only_once_its_lanes_reads_have(loaded, tmp_path,
                                                                      monkeypatch):
    """A read lane READs and hashes on a thread of its own: a fetch cancelled meanwhile (its
    request gone) ends only once that READ has ended, so the request's pages are never given
    back while a lane still writes into them."""
    shard = await start_shard(tmp_path / "s", staging_mb=64)
    client = KVStoreClient(shard.address, timeout_s=5.0)
    w = worker(loaded, client, groups=1, nixl=True)
    keys, _, _ = await cold_then_store(w)
    want = cacheable_blocks(len(PROMPT), w.layout.block_tokens)
    entered, go = threading.Event(), threading.Event()
    real = LayerLoad.hash_landed

    def held(self, blocks, part):  # on a lane's thread, right after its READ landed
        entered.set()
        go.wait(10)
        real(self, blocks, part)

    monkeypatch.setattr(LayerLoad, "hash_landed", held)
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    load = LayerLoad(w.pool, w.fingerprint, keys[:want], pages, 1)
    task = asyncio.create_task(layer_fetch.fetch(load, client, w.endpoint, 5.0))
    await async_wait_until(entered.is_set, 10)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=0.3)
    assert not done and any(lane.busy for lane in _lanes)  # waits for the lane
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not any(lane.busy for lane in _lanes)
    await async_wait_until(lambda: shard.staging.leased == 0, 10)  # its chunks released
    w.pool.release(pages)
    await client.close()
    await shard.stop()


async def test_a_read_lane_without_an_agent_fails_its_reads_and_says_why(monkeypatch, caplog):
    """A lane whose NIXL agent could not be made (on its thread, as the worker started) fails
    each READ, so its blocks are computed, runs nothing after it, and logs why."""
    from pdserve.engine.kv_pool import KVLayout, KVPool
    from pdserve.services import transfer

    def broken(name, pool):
        raise RuntimeError("NIXL_ERR_BACKEND")

    monkeypatch.setattr(transfer, "NixlEndpoint", broken)
    lane = transfer.ReadLane("broken-lane", KVPool(KVLayout(1, 64, "float32"), num_pages=1))
    ran: list[int] = []
    peer = kvstore_pb2.StageResponse(agent_name="store", agent_metadata=b"md")
    assert not await lane.read(peer, ([], []), 1.0, then=lambda: ran.append(1))
    lane.notify(peer, b"release")  # dropped, logged
    await async_wait_until(lambda: caplog.text.count("read lane has no NIXL agent") == 2, 5)
    assert ran == [] and lane.busy == 0 and lane.endpoint is None


async def test_a_reader_forgets_regions_the_store_closed(tmp_path):
    """A closed region's address range can be mapped again by a larger region. NIXL finds a
    remote address by the entry at or just before it, so an old entry inside the new region
    hides it (NIXL_ERR_NOT_FOUND: the cluster tests' lost cache hits). The store's count of
    closed regions makes the reader forget the old ones; without it, the READ fails. A partial
    metadata NIXL refuses makes the reader forget the peer until it is known again."""
    import mmap

    from pdserve.engine.kv_pool import KVLayout, KVPool
    from pdserve.services.nixl_agent import new_agent
    from pdserve.services.transfer import NixlEndpoint

    store = new_agent(f"closing-store-{tmp_path.name}")
    pool = KVPool(KVLayout(num_layers=1, kv_dim=64, dtype="float32"), num_pages=1)
    reader = NixlEndpoint(f"closing-reader-{tmp_path.name}", pool)
    n = pool.page_nbytes
    memory = mmap.mmap(-1, 64 * n)
    for i in range(64):
        memory[i * n:(i + 1) * n] = bytes([i]) * n
    base = ctypes_address(memory)
    remote = reader.remote(store.name, store.get_agent_metadata())

    def register(lo: int, hi: int) -> tuple[object, bytes]:
        descs = store.get_reg_descs([(base + lo * n, (hi - lo) * n, 0, "")], "DRAM")
        return store.register_memory(descs), store.get_partial_agent_metadata(descs, False)

    async def read(i: int) -> bool:
        return await reader.read(remote, ([(pool.page_addr(0), n)], [(base + i * n, n, 0)]),
                                 "DRAM", 5.0)

    async def progress() -> None:  # the store's side of the READs
        while True:
            store.get_new_notifs()
            await asyncio.sleep(0.0005)

    poller = asyncio.create_task(progress())
    try:
        old, md = register(32, 40)
        await reader.load_regions(remote, [md], closed=0)
        assert await read(33) and bytes(pool.page_bytes(0).numpy().data) == bytes([33]) * n
        store.deregister_memory(old)
        new, md = register(0, 64)  # holds the old region's range
        await reader.load_regions(remote, [md], closed=0)  # not told: the old entry stays
        assert await read(1)       # before the old entry: found
        assert not await read(50)  # after the old entry's start: hidden by it
        await reader.load_regions(remote, [md], closed=1)
        assert reader.regions_forgotten == 1
        assert await read(50) and bytes(pool.page_bytes(0).numpy().data) == bytes([50]) * n
        assert await read(33)
        # A partial metadata NIXL refuses (it then drops all it knew of the peer): the reader
        # forgets the peer too, and knows it anew from its full metadata on the next request.
        real_add = reader.agent.add_remote_agent

        def refuse(md):
            raise RuntimeError("NIXL_ERR_NOT_ALLOWED")

        reader.agent.add_remote_agent = refuse
        with pytest.raises(RuntimeError):
            await reader.load_regions(remote, [md + b"?"], closed=1)
        reader.agent.add_remote_agent = real_add
        assert not await read(7)  # forgotten: no READ from it until it is known again
        assert reader.remote(store.name, store.get_agent_metadata()) == remote
        await reader.load_regions(remote, [md], closed=1)
        assert await read(7) and bytes(pool.page_bytes(0).numpy().data) == bytes([7]) * n
    finally:
        poller.cancel()


def ctypes_address(m) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def test_a_store_that_cannot_stage_starts_without_staging(monkeypatch, caplog):
    from pdserve.config import KVStoreSettings
    from pdserve.services.kvstore import main, staging

    assert main.open_staging(KVStoreSettings(nixl_staging_mb=0)) is None
    area = main.open_staging(KVStoreSettings(nixl_staging_mb=1))
    assert area is not None and area.extents.free_bytes == 1 << 20
    area.close()

    def no_ucx(name):
        raise RuntimeError("no UCX transport")

    monkeypatch.setattr(staging, "new_agent", no_ucx)
    with caplog.at_level("WARNING"):
        assert main.open_staging(KVStoreSettings(nixl_staging_mb=1)) is None
    assert "NIXL staging unavailable" in caplog.text


async def test_a_slow_fetch_holds_up_no_prompt_queued_with_it(loaded, tmp_path):
    """A prompt whose later layer groups are held back, queued with another that needs nothing
    from the store: the next step computes the other one to its first token without waiting;
    the held prompt finishes once its blocks come. (A prompt alone in the queue computes while
    its blocks arrive; a step that waits is bounded by the fetch deadline.)"""
    shard = await start_shard(tmp_path / "s")
    client = GatedClient(shard.address, timeout_s=30.0)
    w = worker(loaded, client, groups=3)
    keys, cold_first, _ = await cold_then_store(w)
    want = cacheable_blocks(len(PROMPT), w.layout.block_tokens)
    busy_prompt = [3 + i % 900 for i in range(1500)]  # keeps the engine busy meanwhile
    p0 = w.pool.reserve(w.layout.pages_for(len(busy_prompt)))
    busy_id = rid()
    busy = asyncio.create_task(w.compute_prompt(busy_id, busy_prompt, p0))

    def busy_computing() -> bool:
        step = w.engine.in_step
        return step is not None and busy_id in [s.request_id for s in step.seqs]

    await async_wait_until(busy_computing, 30)
    pages = w.pool.reserve(w.layout.pages_for(len(PROMPT)))
    held = asyncio.create_task(fetch_and_compute(w, pages, keys[:want]))
    other = [7 + i for i in range(100)]
    p2 = w.pool.reserve(w.layout.pages_for(len(other)))
    other_task = asyncio.create_task(compute(w, other, p2))
    # Both handed to the engine (their outboxes open) while it was still busy: the step after
    # that one had both to choose from, and the other prompt's did not wait for the held
    # blocks (their gate opens only below).
    await async_wait_until(lambda: len(w.thread.outboxes) == 3, 30)
    assert busy_computing(), "the engine was to be busy while both were queued"
    await asyncio.wait_for(other_task, 120)
    assert not held.done() and not client.gate.is_set()
    client.gate.set()
    got, n, _ = await asyncio.wait_for(held, 120)
    assert n == want and got == cold_first
    await busy
    w.pool.release(p0 + pages + p2)
    await client.close()
    await shard.stop()


async def test_the_worker_connects_to_the_stores_staging_agents_ahead(loaded, tmp_path):
    """At start a prefill worker asks each shard for its staging agent (a Stage of no blocks:
    nothing staged, nothing leased) and connects to it, its read lanes too, so the first READ
    does not; a shard without staging is left to the stream; a worker that does not fetch over
    NIXL skips it."""
    shard = await start_shard(tmp_path / "s", staging_mb=4)
    plain = await start_shard(tmp_path / "p")
    client = KVStoreClient(f"{shard.address},{plain.address}", timeout_s=5.0)
    w = worker(loaded, client, groups=4, nixl=True)
    assert await w.connect_stores(within_s=1.0) == 1
    assert shard.staging.name in w.endpoint._remote_md
    assert all(shard.staging.name in lane.endpoint._remote_md for lane in _lanes)  # each lane
    assert shard.staging.leased == 0 and shard.staging.staged_blocks == 0
    w.fetch_nixl = False
    assert await w.connect_stores(within_s=1.0) == 0
    await client.close()
    await shard.stop()
    await plain.stop()

