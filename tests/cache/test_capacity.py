"""Eviction order (LRU, tails before parents), watermarks, expiry, durability settings and the
offline tools, on a real RocksDB."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdserve.cache.block_hash import block_hashes
from pdserve.cache.codec import encode_block
from pdserve.cache.store import BlockStore
from tests.helpers import FakeClock, start_shard, wait_until

FP = "L1-D4-float32-B4-test"
SIZE = 1000  # payload bytes; each stored value is SIZE + header


def chain(salt: str, n: int):
    keys = block_hashes("ns", salt, list(range(4 * n)), 4)
    return [(k, encode_block(k, FP, 4, bytes([i]) * SIZE)) for i, k in enumerate(keys)]


def put_chain(store, blocks, start=0):
    store.put_many(blocks[start:], depths=list(range(start, len(blocks))))


def ms_clock() -> FakeClock:
    """The store's clock of access times (milliseconds), moved by hand."""
    return FakeClock(1_700_000_000_000)


def test_lru_order_takes_tails_before_parents(tmp_path):
    clock = ms_clock()
    s = BlockStore(tmp_path, clock_ms=clock)
    a, b = chain("a", 3), chain("b", 2)
    put_chain(s, a)
    clock.advance(10)
    put_chain(s, b)
    clock.advance(10)
    s.get_many([k for k, _ in a[:2]])  # chain a's first two blocks are used again
    ka, kb = [k for k, _ in a], [k for k, _ in b]
    # a[2] (stale tail) first; then chain b, tail first; then a's used prefix, tail first.
    assert s.eviction_order() == [ka[2], kb[1], kb[0], ka[1], ka[0]]
    s.close()


def test_eviction_keeps_size_between_watermarks(tmp_path):
    value_size = len(chain("x", 1)[0][1])
    cap = 20 * value_size
    clock = ms_clock()
    s = BlockStore(tmp_path, capacity_bytes=cap, high_watermark=0.9, low_watermark=0.5,
                   clock_ms=clock)
    for i in range(30):
        clock.advance(1)
        put_chain(s, chain(f"c{i}", 2))
        s.evict()  # the background evictor does the same; called here to be deterministic
        assert s.stats.num_bytes <= 0.9 * cap + 2 * value_size
    assert s.stats.evicted > 0
    assert s.stats.num_bytes <= 0.9 * cap
    # The newest chain survived; the oldest went.
    assert s.lookup([k for k, _ in chain("c29", 2)]) == 2
    assert s.lookup([k for k, _ in chain("c0", 2)]) == 0
    s.close()


def test_background_evictor_bounds_a_long_write_loop(tmp_path):
    value_size = len(chain("x", 1)[0][1])
    cap = 40 * value_size
    s = BlockStore(tmp_path, capacity_bytes=cap, high_watermark=0.8, low_watermark=0.6)
    peak = 0
    for i in range(200):
        put_chain(s, chain(f"loop{i}", 1))
        peak = max(peak, s.stats.num_bytes)
    wait_until(lambda: s.stats.num_bytes <= 0.8 * cap, 10, what="evicted below the watermark")
    assert s.stats.evicted >= 200 - 40
    # The evictor runs beside the writer: the store went over the high watermark by at most
    # what was put before the evictor's thread caught up, never without bound.
    assert 0.8 * cap < peak <= 0.8 * cap + 200 * value_size // 4
    s.close()


def test_expiry_by_age(tmp_path):
    clock = ms_clock()
    s = BlockStore(tmp_path, max_age_s=0.2, clock_ms=clock)
    old, new = chain("old", 2), chain("new", 2)
    put_chain(s, old)
    put_chain(s, new)
    clock.advance(300)
    s.get_many([k for k, _ in new])  # new is used again; old is now over 0.2 s unused
    assert s.expire() == 2
    assert s.lookup([k for k, _ in old]) == 0
    assert s.lookup([k for k, _ in new]) == 2
    assert s.stats.expired == 2
    s.close()


@pytest.mark.integration
def test_counters_and_blocks_survive_reopen_and_offline_tools(tmp_path):
    s = BlockStore(tmp_path / "kvstore", sync="interval", sync_interval_ms=20)
    blocks = chain("t", 3)
    put_chain(s, blocks)
    s.get_many([k for k, _ in blocks])
    bad = bytearray(blocks[1][1])
    bad[-5] ^= 0x10
    s.raw_put(blocks[1][0], bytes(bad))  # flip a byte through the raw database
    s.close()
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "pdserve", "kvstore", *a, "--data-dir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=60)
    r = run("stats")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["num_blocks"] == 3 and st["hits"] == 3 and st["puts"] == 3
    # The segment files hold the three blocks (the replaced copy's range was freed; small
    # blocks share filesystem pages, hence the slack).
    assert st["num_bytes"] <= st["bytes_on_disk"] <= 4 * st["num_bytes"] + (1 << 20)
    r = run("verify")
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["checked"] == 3
    assert report["problems"] == [{"key": blocks[1][0].hex(),
                                   "problem": "payload checksum mismatch"}]
    s = BlockStore(tmp_path / "kvstore")
    assert s.get_many([k for k, _ in blocks]) == [blocks[0][1]]  # the corrupt one is a miss
    assert s.stats.corrupt == 1 and s.stats.hits == 4
    s.close()


async def test_evicted_and_expired_misses_are_told_apart_from_never_stored(tmp_path):
    """The ledger's miss reason 'evicted' comes from here: the store remembers removed keys, the
    Lookup answer carries it through the gRPC client, and a key put again is no longer one."""
    from pdserve.services.kvstore_client import KVStoreClient

    clock = ms_clock()
    shard = await start_shard(tmp_path / "shard", capacity_bytes=3 * len(chain("x", 1)[0][1]),
                              high_watermark=0.99, low_watermark=0.99, clock_ms=clock)
    s, address = shard.store, shard.address
    old, new, never = chain("old", 2), chain("new", 2), chain("never", 2)
    put_chain(s, old)
    clock.advance(10)
    put_chain(s, new)
    wait_until(lambda: s.stats.evicted == 2, 10)  # the older chain goes, tail first
    assert s.was_removed([k for k, _ in old]) == [True, True]
    assert s.was_removed([k for k, _ in new + never]) == [False] * 4
    client = KVStoreClient(address, timeout_s=2)
    r = await client.lookup_detail([k for k, _ in old])
    assert (r.prefix, r.first_miss_evicted) == (0, True)
    r = await client.lookup_detail([k for k, _ in never])
    assert (r.prefix, r.first_miss_evicted) == (0, False)
    r = await client.lookup_detail([k for k, _ in new])
    assert (r.prefix, r.first_miss_evicted) == (2, False)
    clock.advance(10)
    put_chain(s, old)  # stored again: a plain hit, not 'evicted'
    assert s.was_removed([k for k, _ in old]) == [False, False]
    s.upkeep.max_age_s = 0.001
    clock.advance(10)
    s.expire()  # (the maintenance thread may take some first: either way they are gone)
    assert s.was_removed([k for k, _ in old + new]) == [True] * 4
    await client.close()
    await shard.stop()
