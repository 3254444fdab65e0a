"""A prefill worker's pages (services/prefill/guard.py) on a real page pool: a request that
finds too few free waits for them, earliest due first, woken by pages freed on any
thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pdserve.engine.errors import OutOfPages
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.layout import KVLayout
from pdserve.services.prefill.guard import PageGuard
from tests.helpers import async_wait_until


def guard(num_pages: int = 4) -> PageGuard:
    return PageGuard(KVPool(KVLayout(num_layers=2, kv_dim=8, dtype="float32", block_tokens=4),
                            num_pages))


async def test_requests_wait_for_pages_earliest_due_first_and_none_passes_the_first():
    g = guard(5)
    first = await g.reserve(3)
    got: list[str] = []

    async def want(name: str, n: int, due: float) -> list:
        pages = await g.reserve(n, due)
        got.append(name)
        return pages

    late = asyncio.create_task(want("late", 3, due=5.0))  # 2 free: waits
    await async_wait_until(lambda: len(g._waiting) == 1, 5)
    # Due earlier: it goes first, and takes a free page at once.
    soon = await asyncio.wait_for(want("soon", 1, due=1.0), 5)
    # Due later than the first waiter: it waits, though a page is free (a large prompt is not
    # starved by small ones).
    later = asyncio.create_task(want("later", 1, due=9.0))
    await async_wait_until(lambda: len(g._waiting) == 2, 5)
    assert g.pool.num_free == 1 and not late.done() and not later.done()
    # Freed on another thread (as the engine's and helper threads do): the waiters wake.
    threading.Thread(target=g.free, args=(first,)).start()
    await asyncio.wait_for(asyncio.gather(late, later), 5)
    assert got == ["soon", "late", "later"] and g.num_waited == 2
    for pages in (soon, late.result(), later.result()):
        g.free(pages)
    assert g.pool.num_free == 5
    g.pool.check_integrity()


async def test_a_request_larger_than_the_pool_fails_at_once():
    g = guard(4)
    with pytest.raises(OutOfPages, match="needs 5 KV pages, 4 free"):
        await g.reserve(5)


async def test_a_cancelled_waiter_takes_nothing_and_the_next_one_gets_the_pages():
    g = guard(2)
    held = await g.reserve(2)
    gone = asyncio.create_task(g.reserve(2))
    await async_wait_until(lambda: len(g._waiting) == 1, 5)
    nxt = asyncio.create_task(g.reserve(2))
    gone.cancel()  # the client went away while its prompt waited for pages
    g.free(held)
    pages = await asyncio.wait_for(nxt, 5)
    assert len(pages) == 2 and g.pool.num_free == 0
    g.free(pages)
    g.pool.check_integrity()
