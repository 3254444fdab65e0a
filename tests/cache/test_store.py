from __future__ import annotations

import os
import subprocess
import sys

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


def test_bytes_flipped_in_a_segment_file_on_disk_are_a_miss(tmp_path):
    """Damage to a segment file on disk is caught on read, deleted, counted, and found by
    verify, which goes on past it to the blocks after."""
    blocks = make_blocks(3, size=64 * 1024)
    keys = [k for k, _ in blocks]
    s = BlockStore(tmp_path)
    s.put_many(blocks, depths=[0, 1, 2])
    s.close()
    seg_files = sorted((tmp_path / "segments").glob("*.seg"))
    assert len(seg_files) == 1, "one put is one append to one segment"
    data = bytearray(seg_files[0].read_bytes())
    assert bytes(data) == b"".join(v for _, v in blocks)  # back to back, nothing else
    data[len(blocks[0][1]) + HEADER_SIZE + 30_000] ^= 0x40  # inside the second block's payload
    seg_files[0].write_bytes(bytes(data))
    s = BlockStore(tmp_path, read_only=True)
    checked, bad = s.verify_all()
    assert checked == 3 and bad == [(keys[1], "payload checksum mismatch")]
    s.close()
    s = BlockStore(tmp_path)
    got = s.get_many(keys)
    assert got == [blocks[0][1]]
    assert s.stats.corrupt == 1 and s.lookup(keys) == 1
    assert s.get_many(keys[2:]) == [blocks[2][1]]  # its neighbour is untouched
    s.close()


def test_missing_or_short_segment_is_a_miss_and_verify_names_it(tmp_path):
    a, b = make_blocks(2, size=8192)
    s = BlockStore(tmp_path, segment_bytes=1)  # every put starts a new segment
    s.put_many([a])
    s.put_many([b])
    s.close()
    first, second = sorted((tmp_path / "segments").glob("*.seg"))
    first.unlink()
    os.truncate(second, 100)
    s = BlockStore(tmp_path, read_only=True)
    checked, bad = s.verify_all()
    assert checked == 2
    assert sorted(bad) == sorted([(a[0], "segment file missing"),
                                  (b[0], f"segment holds 100 of the block's {len(b[1])} bytes")])
    s.close()
    s = BlockStore(tmp_path)
    assert s.get_many([a[0]]) == [] and s.get_many([b[0]]) == []
    assert s.stats.corrupt == 2 and s.stats.num_blocks == 0
    s.close()


def test_segments_roll_over_and_every_block_reads_back_after_reopen(tmp_path):
    blocks = make_blocks(12, size=20_000)
    s = BlockStore(tmp_path, segment_bytes=30_000)  # a new segment after every put
    for i in range(0, 12, 2):
        s.put_many(blocks[i:i + 2], depths=[i, i + 1])
    assert s.get_many([k for k, _ in blocks]) == [v for _, v in blocks]
    s.close()
    segs = sorted((tmp_path / "segments").glob("*.seg"))
    assert len(segs) == 6
    s = BlockStore(tmp_path)
    assert s.get_many([k for k, _ in blocks]) == [v for _, v in blocks]
    more = make_blocks(1, salt="after")
    s.put_many(more)  # a restart writes to a new segment, never into an old one
    assert sorted((tmp_path / "segments").glob("*.seg"))[:-1] == segs
    s.close()


def test_start_after_a_crash_drops_unacknowledged_bytes(tmp_path):
    """A SIGKILL between a segment append and its metadata batch leaves bytes no block points
    at: the next start cuts them off, and removes segment files nothing points into."""
    blocks = make_blocks(2, size=8192)
    s = BlockStore(tmp_path)
    s.put_many(blocks)
    s.close()
    seg, = sorted((tmp_path / "segments").glob("*.seg"))
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(b"x" * 5000)  # a put cut short
    orphan = seg.with_name("00000000000000ff.seg")
    orphan.write_bytes(b"y" * 3000)  # a whole segment no metadata reached
    s = BlockStore(tmp_path)
    assert seg.stat().st_size == size and not orphan.exists()
    assert s.get_many([k for k, _ in blocks]) == [v for _, v in blocks]
    s.put_many(make_blocks(1, salt="next"))
    assert sorted(p.name for p in (tmp_path / "segments").glob("*.seg"))[-1] > orphan.name
    s.close()


def test_eviction_frees_the_bytes_on_disk(tmp_path):
    """Evicted blocks' ranges are punched out of their segment at once; an emptied segment is
    removed. (A filesystem without hole punching frees them with the whole segment.)"""
    blocks = make_blocks(40, size=64 * 1024)
    size = len(blocks[0][1])
    s = BlockStore(tmp_path, capacity_bytes=20 * size, high_watermark=0.9, low_watermark=0.5,
                   segment_bytes=8 * size)
    for i in range(0, 40, 4):
        s.put_many(blocks[i:i + 4], depths=[0, 1, 2, 3])
        s.evict()
    assert s.stats.num_bytes <= 0.9 * 20 * size
    on_disk = s.bytes_on_disk()
    if s.segments.can_punch_holes:
        assert on_disk <= s.stats.num_bytes + s.stats.num_blocks * 8192 + 8 * size
    else:
        assert on_disk <= s.stats.num_bytes + 16 * size
    assert len(list((tmp_path / "segments").glob("*.seg"))) <= 4  # early segments removed
    assert s.get_many([k for k, _ in blocks[-4:]]) == [v for _, v in blocks[-4:]]
    s.close()


def test_a_block_evicted_while_it_is_read_is_a_miss_not_corruption(tmp_path):
    blocks = make_blocks(2, size=8192)
    s = BlockStore(tmp_path)
    s.put_many(blocks)
    real_read = s.segments.read

    def read_after_eviction(seg, off, length, fds):
        s.delete([blocks[0][0]])  # the evictor runs between locate and read
        return real_read(seg, off, length, fds)

    s.segments.read = read_after_eviction
    assert s.get_many([k for k, _ in blocks]) == []
    assert s.stats.corrupt == 0
    s.close()


def test_a_store_of_the_blob_file_layout_is_read_and_moved_into_segments(tmp_path):
    """Stores written before segment files hold each block in the `blocks` column family: they
    read back as they are (read-only tools too), and a writable open moves them."""
    from pdserve.cache.records import Meta

    blocks = make_blocks(20, size=8192)
    s = BlockStore(tmp_path)
    for depth, (k, v) in enumerate(blocks):  # the old layout, written through the raw database
        s.raw_old_block(k, v, Meta(1000 + depth, 2, len(v), depth))
    s.close()
    ro = BlockStore(tmp_path, read_only=True)
    assert ro.verify_all() == (20, [])
    assert ro.get_many([blocks[0][0]]) == [blocks[0][1]]
    ro.close()
    s = BlockStore(tmp_path)
    assert s.stats.num_blocks == 20 and s.stats.num_bytes == sum(len(v) for _, v in blocks)
    assert all(len(s.catalog.raw_location(k) or b"") == 24 for k, _ in blocks)  # locations now
    assert all(s.location(k) is not None for k, _ in blocks)
    assert s.eviction_order()[0] == blocks[0][0]  # access times carried over
    assert s.get_many([k for k, _ in blocks]) == [v for _, v in blocks]
    s.close()


def test_get_into_reads_verified_blocks_into_the_callers_buffer(tmp_path):
    """get_into = get_many's bytes, written back to back into caller memory, checksummed chunk
    by chunk (blocks larger than a chunk, one damaged past the first chunk)."""
    from pdserve.cache.reader import READ_CHUNK

    blocks = make_blocks(4, size=READ_CHUNK * 2 + 1000)
    keys = [k for k, _ in blocks]
    size = len(blocks[0][1])
    s = BlockStore(tmp_path)
    s.put_many(blocks, depths=[0, 1, 2, 3])
    buf = bytearray(4 * size + 10)
    assert s.get_into(keys, buf) == [size] * 4
    assert bytes(buf[:4 * size]) == b"".join(v for _, v in blocks)
    small = bytearray(2 * size + 5)  # stops at the first block that does not fit
    assert s.get_into(keys, small) == [size, size]
    assert bytes(small[:2 * size]) == blocks[0][1] + blocks[1][1]
    assert s.stats.corrupt == 0
    bad = bytearray(blocks[2][1])
    bad[READ_CHUNK + 7] ^= 0x01  # in the block's second chunk
    s.raw_put(keys[2], bytes(bad))
    assert s.get_into(keys, buf) == [size, size]
    assert s.stats.corrupt == 1 and s.lookup(keys) == 2
    wrong_key = bytearray(blocks[3][1])
    wrong_key[30] ^= 0x01  # the header's copy of the key
    s.raw_put(keys[3], bytes(wrong_key))
    assert s.get_into(keys[3:], buf) == [] and s.stats.corrupt == 2
    s.close()


@pytest.mark.integration
def test_large_buffers_are_kept_on_the_heap():
    """glibc takes the mmap threshold (cache/memory.py): in a fresh process a 3 MiB block is a
    fresh mmap before the call (glibc's mallinfo2 counts it) and comes from the heap after."""
    code = """
import ctypes, ctypes.util
from pdserve.cache.memory import keep_large_buffers_on_heap
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def mapped_blocks_of_one_malloc():
    before = libc.mallinfo2().hblks
    p = libc.malloc(3 << 20)
    after = libc.mallinfo2().hblks
    libc.free(p)
    return after - before
print(mapped_blocks_of_one_malloc(), keep_large_buffers_on_heap(),
      mapped_blocks_of_one_malloc())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "True", "0"]


def test_get_parts_streams_every_block_part_by_part_and_checks_the_whole(tmp_path):
    """Part 0 of every block (its header and first bytes), then part 1 of every block, ...;
    the parts of a block put together are its value. A byte flipped in a later part is not
    caught by any part alone: the block's checksum fails after its last part, and the block is
    deleted and counted like any corrupt block."""
    blocks = make_blocks(4, size=12_000)
    keys = [k for k, _ in blocks]
    cuts = [3000, 6000, 9000]
    s = BlockStore(tmp_path)
    s.put_many(blocks[:3])
    parts = list(s.get_parts(keys, cuts))
    assert len(parts) == 4 and all(len(p) == 3 for p in parts)  # the 4th key is not stored
    assert [len(v) for v in parts[0]] == [HEADER_SIZE + 3000] * 3
    assert [len(v) for v in parts[3]] == [3000] * 3
    for i, (_, value) in enumerate(blocks[:3]):
        assert b"".join(p[i] for p in parts) == value
    assert (s.stats.hits, s.stats.misses) == (3, 1)
    # Damage inside block 1's third part.
    seg = sorted((tmp_path / "segments").glob("*.seg"))[0]
    data = bytearray(seg.read_bytes())
    data[len(blocks[0][1]) + HEADER_SIZE + 7000] ^= 0x10
    seg.write_bytes(bytes(data))
    parts = list(s.get_parts(keys, cuts))
    assert all(len(p) == 3 for p in parts)  # sent whole: the damage shows only at the end
    assert s.stats.corrupt == 1 and s.lookup(keys) == 1  # then deleted
    assert [b"".join(p[0] for p in parts)] == [blocks[0][1]]
    with pytest.raises(ValueError, match="not inside"):
        list(s.get_parts(keys, [3000, 12_000]))
    with pytest.raises(ValueError, match="increasing"):
        list(s.get_parts(keys, [3000, 3000]))
    s.close()


def test_a_block_encoded_with_a_known_checksum_is_the_same_bytes():
    """encode_block takes the payload's xxh3 when the caller has it (prefill: the transfer's
    page digests) and gives the same bytes as computing it; the store verifies either."""
    from pdserve.cache.codec import checksum, encode_block, verify_block

    key = block_hashes("ns", "", list(range(64)), 64)[0]
    payload = bytes(range(256)) * 40
    a = encode_block(key, "fp", 64, memoryview(payload))
    assert a == encode_block(key, "fp", 64, payload, checksum(payload))
    assert bytes(verify_block(key, a)) == payload
    with pytest.raises(CorruptBlock, match="checksum"):
        verify_block(key, encode_block(key, "fp", 64, payload, checksum(payload) ^ 1))
