from __future__ import annotations

import os

import pytest
from pdserve.cache.block_hash import block_hashes
from pdserve.cache.codec import HEADER_SIZE, encode_block, verify_block
from pdserve.cache.errors import CorruptBlock
from pdserve.cache.store import BlockStore

FP = "L2-D8-float32-B4-test"


def make_blocks(n: int, size: int = 4096, salt: str = ""):
    keys = block_hashes("ns", salt, list(range(n * 4)), 4)
    return [(k, encode_block(k, FP, 4, os.urandom(size))) for k in keys]


def test_codec_roundtrip_and_checks():
    (key, value), (key2, _) = make_blocks(2)
    assert bytes(verify_block(key, value, FP)) == value[HEADER_SIZE:]
    with pytest.raises(CorruptBlock, match="another key"):
        verify_block(key2, value)
    with pytest.raises(CorruptBlock, match="layout"):
        verify_block(key, value, "other-layout")
    flipped = bytearray(value)
    flipped[HEADER_SIZE + 100] ^= 0x01
    with pytest.raises(CorruptBlock, match="checksum"):
        verify_block(key, bytes(flipped))
    with pytest.raises(CorruptBlock, match="length"):
        verify_block(key, value[:-1])
    with pytest.raises(CorruptBlock, match="magic"):
        verify_block(key, b"XXXX" + value[4:])


def test_put_lookup_get_and_reopen(tmp_path):
    blocks = make_blocks(5)
    keys = [k for k, _ in blocks]
    s = BlockStore(tmp_path)
    assert s.put_many(blocks[:3]) == 3
    assert s.put_many(blocks[:3]) == 0  # already there
    assert s.lookup(keys) == 3
    assert s.get_many(keys) == [v for _, v in blocks[:3]]
    assert (s.stats.num_blocks, s.stats.hits, s.stats.misses) == (3, 3, 2)
    s.close()
    s = BlockStore(tmp_path)  # a second start finds the blocks of the first
    assert s.lookup(keys) == 3
    assert s.get_many(keys[:2]) == [v for _, v in blocks[:2]]
    assert s.stats.num_bytes == sum(len(v) for _, v in blocks[:3])
    s.close()


def test_corrupt_block_is_deleted_and_served_as_miss(tmp_path):
    blocks = make_blocks(3)
    keys = [k for k, _ in blocks]
    s = BlockStore(tmp_path)
    s.put_many(blocks)
    bad = bytearray(blocks[1][1])
    bad[-1] ^= 0xFF
    s.raw_put(keys[1], bytes(bad))
    assert s.get_many(keys) == [blocks[0][1]]  # stops at the corrupt block
    assert s.stats.corrupt == 1
    assert s.lookup(keys) == 1  # deleted
    assert s.stats.num_blocks == 2
    s.close()


def test_put_refuses_unverifiable_blocks(tmp_path):
    (key, value), = make_blocks(1)
    s = BlockStore(tmp_path)
    with pytest.raises(CorruptBlock):
        s.put_many([(key, value[:-3])])
    assert s.lookup([key]) == 0
    s.close()


def test_bad_sync_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sync"):
        BlockStore(tmp_path, sync="sometimes")


def test_bytes_flipped_in_a_blob_file_on_disk_are_a_miss(tmp_path):
    """RocksDB's own blob checksum is off for reads (the block's xxh3 covers it): damage to a
    blob file on disk is still caught on read, deleted, counted, and found by verify."""
    blocks = make_blocks(3, size=64 * 1024)
    keys = [k for k, _ in blocks]
    s = BlockStore(tmp_path)
    s.put_many(blocks, depths=[0, 1, 2])
    s.close()
    blob_files = sorted(tmp_path.glob("*.blob"))
    assert blob_files, "blocks are expected in blob files"
    data = bytearray(blob_files[0].read_bytes())
    # The second block's payload: find its bytes and flip one in the middle.
    at = data.find(blocks[1][1][HEADER_SIZE:HEADER_SIZE + 64])
    assert at > 0
    data[at + 30_000] ^= 0x40
    blob_files[0].write_bytes(bytes(data))
    s = BlockStore(tmp_path, read_only=True)
    checked, bad = s.verify_all()
    assert checked == 3 and [k for k, _ in bad] == [keys[1]]
    s.close()
    s = BlockStore(tmp_path)
    got = s.get_many(keys)
    assert got == [blocks[0][1]]
    assert s.stats.corrupt == 1 and s.lookup(keys) == 1
    s.close()


def test_large_buffers_can_be_kept_on_the_heap():
    """glibc takes the mmap and trim thresholds (cache/memory.py); blocks still read back."""
    from pdserve.cache.memory import keep_large_buffers_on_heap

    assert keep_large_buffers_on_heap() is True
    big = bytes(range(256)) * (3 << 12)  # 3 MiB: above glibc's default mmap threshold
    assert len(bytearray(big)) == len(big)
