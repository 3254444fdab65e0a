"""A prefill worker's background block writes (services/prefill/blocks.py BlockIO): a request
that comes right after the one that wrote its prompt's blocks must find them, whether the
write is still in flight when it comes or finished between the gateway's look and its
arrival. A real kvstore shard (RocksDB on a temp dir, gRPC on port 0)."""

from __future__ import annotations

import os

import pytest

from pdserve.cache.block_hash import BlockHash
from pdserve.cache.codec import encode_block
from pdserve.services.kvstore_client import KVStoreClient, StoreBlock
from pdserve.services.prefill import blocks as blocks_mod
from pdserve.services.prefill.blocks import BlockIO
from tests.helpers import start_shard


def chain(n: int, tag: bytes) -> list[StoreBlock]:
    keys = [BlockHash(tag.ljust(31, b"-") + bytes([i])) for i in range(n)]
    return [StoreBlock(k, encode_block(k, "fp", 64, os.urandom(4096)), i)
            for i, k in enumerate(keys)]


@pytest.fixture
async def io(tmp_path):
    """A BlockIO writing to a real shard; the pages and the guard are only for loading and
    encoding, which these tests do not do."""
    shard = await start_shard(tmp_path / "s")
    client = KVStoreClient(shard.address, timeout_s=5.0)
    yield BlockIO(None, "fp", client, None)  # type: ignore[arg-type]
    await client.close()
    await shard.stop()


async def test_finished_and_in_flight_writes_are_known_and_others_are_not(io):
    a, b = chain(3, b"a"), chain(2, b"b")
    io.put_later(a)
    # In flight: the look waits for the write, after which the store holds the blocks.
    assert await io.written([x.key for x in a[1:]], timeout_s=10.0)
    assert await io.kvstore.lookup([x.key for x in a]) == 3
    await io.drain()
    assert not io._writing
    # Finished before the look (the race CI hit): still known, so the worker looks again.
    assert await io.written([a[2].key], timeout_s=10.0)
    # Never written by this worker: no second look.
    assert not await io.written([x.key for x in b], timeout_s=10.0)
    assert not await io.written([], timeout_s=10.0)


async def test_the_memory_of_finished_writes_is_bounded(io, monkeypatch):
    monkeypatch.setattr(blocks_mod, "RECENT_WRITES", 4)
    old, new = chain(3, b"old"), chain(3, b"new")
    io.put_later(old)
    await io.drain()
    io.put_later(new)
    await io.drain()
    assert len(io._recent) == 4
    # The oldest two are forgotten (a look costs one lookup; forgetting costs only that).
    assert not await io.written([x.key for x in old[:2]], timeout_s=1.0)
    assert await io.written([old[2].key], timeout_s=1.0)
    assert await io.written([new[0].key], timeout_s=1.0)
