"""Sharded kvstore: rendezvous placement, and a dead shard is a miss, not an error."""

from __future__ import annotations

import os
from collections import Counter

from pdserve.cache.block_hash import block_hashes
from pdserve.cache.codec import encode_block
from pdserve.services.kvstore_client import KVStoreClient, StoreBlock, rendezvous
from tests.helpers import start_shard


def test_rendezvous_spreads_evenly_and_moves_little():
    keys = [os.urandom(32) for _ in range(100_000)]
    four = [f"kvstore-{i}.kvstore:50060" for i in range(4)]
    owner4 = [rendezvous(k, four) for k in keys]
    counts = Counter(owner4)
    mean = len(keys) / 4
    assert max(counts.values()) / mean <= 1.2
    owner5 = [rendezvous(k, four + ["kvstore-4.kvstore:50060"]) for k in keys]
    moved = sum(a != b for a, b in zip(owner4, owner5))
    assert moved / len(keys) <= 0.25
    assert all(b == 4 for a, b in zip(owner4, owner5) if a != b)  # only to the new shard


async def test_three_shards_and_one_down(tmp_path):
    shards = [await start_shard(tmp_path / f"s{i}") for i in range(3)]
    client = KVStoreClient(",".join(s.address for s in shards), timeout_s=1.0)
    n = 48  # shards are named by their random ports: 48 blocks miss one of 3 once in 10^8
    keys = block_hashes("ns", "", list(range(64 * n)), 64)
    blocks = [StoreBlock(k, encode_block(k, "fp", 64, os.urandom(2048)), i)
              for i, k in enumerate(keys)]
    assert await client.put(blocks) == n
    owners = [rendezvous(k, client.shard_names) for k in keys]
    assert len(set(owners)) == 3  # the chain really spans the shards
    for i, shard in enumerate(shards):
        assert shard.store.stats.num_blocks == owners.count(i)
    assert await client.lookup(keys) == n
    assert await client.get(keys) == [b.value for b in blocks]
    # One shard down: its blocks are misses; the chain's prefix before them still hits.
    dead = owners[5]
    await shards[dead].server.stop(0)
    first_dead = owners.index(dead)
    assert await client.lookup(keys) == first_dead
    assert await client.get(keys) == [b.value for b in blocks[:first_dead]]
    assert await client.put(blocks) == 0  # nothing new; the dead shard's share is dropped
    await client.close()
    for shard in shards:
        await shard.stop()


async def test_all_shards_down_is_no_answer_not_an_error(tmp_path):
    client = KVStoreClient("127.0.0.1:1,127.0.0.1:2", timeout_s=0.5)
    keys = block_hashes("ns", "", list(range(128)), 64)
    assert await client.lookup(keys) is None
    assert await client.get(keys) == []
    await client.close()
