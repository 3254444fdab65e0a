from __future__ import annotations

import pytest

from pdserve.engine.errors import OutOfPages
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.layout import KVLayout


def make_pool(num_pages: int = 4, block_tokens: int = 4) -> KVPool:
    return KVPool(KVLayout(num_layers=2, kv_dim=8, dtype="float32", block_tokens=block_tokens),
                  num_pages)


def test_reserve_release_exact_ids():
    pool = make_pool(4)
    assert pool.reserve(2) == [0, 1]
    assert pool.reserve(1) == [2]
    pool.release([0])
    assert pool.reserve(2) == [0, 3]  # the page freed last comes first (it is warm)
    pool.release([3, 0, 2])
    assert pool.reserve(3) == [3, 0, 2]  # in the order freed
    assert pool.num_free == 0
    with pytest.raises(OutOfPages) as e:
        pool.reserve(1)
    assert (e.value.needed, e.value.free) == (1, 0)
    pool.check_integrity()
    with pytest.raises(ValueError):
        pool.release([7])


def test_pages_are_contiguous_and_sized_by_layout():
    pool = make_pool(3, block_tokens=4)
    layout = pool.layout
    assert layout.bytes_per_block == 2 * 4 * 8 * 4 == pool.page_nbytes
    assert pool.page_addr(1) - pool.page_addr(0) == pool.page_nbytes
    data = bytes(range(256)) * (pool.page_nbytes // 256)
    pool.write_page(2, data)
    assert pool.read_pages([2]) == data
    with pytest.raises(ValueError):
        pool.write_page(0, data[:-1])


def test_layout_fingerprint_differs_by_dtype_and_block():
    a = KVLayout(30, 384, "float32", 64)
    assert a.fingerprint() != KVLayout(30, 384, "bfloat16", 64).fingerprint()
    assert a.fingerprint() != KVLayout(30, 384, "float32", 32).fingerprint()
    assert a.bytes_per_token == 30 * 384 * 4
    assert a.pages_for(64) == 1 and a.pages_for(65) == 2


def _resident_bytes(pool: KVPool) -> int:
    """Bytes of the pool's memory backed by RAM now (mincore(2) over its range)."""
    import ctypes
    import mmap

    base, size = pool.kv.data_ptr(), pool.kv.numel() * pool.kv.element_size()
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(base), ctypes.c_size_t(size), vec) == 0
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def test_prefault_backs_the_pool_and_keeps_what_pages_hold():
    pool = KVPool(KVLayout(num_layers=2, kv_dim=64, dtype="float32", block_tokens=16), 64)
    size = pool.kv.numel() * pool.kv.element_size()
    pool.write_page(3, bytes(range(256)) * (pool.page_nbytes // 256))
    before = _resident_bytes(pool)
    assert before < size // 2  # untouched pages take no memory until written
    assert pool.prefault() == size
    assert _resident_bytes(pool) == size
    assert pool.read_pages([3]) == bytes(range(256)) * (pool.page_nbytes // 256)
    assert not pool.kv[:3].any() and not pool.kv[4:].any()


def test_prefault_stops_when_asked():
    import threading

    pool = KVPool(KVLayout(num_layers=2, kv_dim=64, dtype="float32", block_tokens=16), 8)
    stop = threading.Event()
    stop.set()
    assert pool.prefault(stop) == 0
