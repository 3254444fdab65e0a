"""A prefill worker's pages (services/prefill/guard.py) on a real page pool: a request that
finds too few free waits for them, first come first served, woken by pages freed on any
thread; pages another thread still touches are freed when it is done."""

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


async def test_a_request_waits_for_pages_in_arrival_order_and_never_fails_for_them():
    g = guard(4)
    first = await g.reserve(3)
    got: list[str] = []

    async def want(name: str, n: int) -> list:
        pages = await g.reserve(n)
        got.append(name)
        return pages

    two = asyncio.create_task(want("two", 2))   # 1 free: waits
    await async_wait_until(lambda: g._turn.locked(), 5)
    one = asyncio.create_task(want("one", 1))   # 1 free, but it came later: waits its turn
    await asyncio.sleep(0)  # (lets it run to its wait; what is asserted is the order)
    assert not two.done() and not one.done()
    # Freed on another thread (as the engine's and helper threads do): the first waiter wakes.
    threading.Thread(target=g.free, args=(first,)).start()
    await asyncio.wait_for(asyncio.gather(two, one), 5)
    assert got == ["two", "one"] and g.num_waited == 2
    g.free(two.result())
    g.free(one.result())
    assert g.pool.num_free == 4
    g.pool.check_integrity()


async def test_a_request_larger_than_the_pool_fails_at_once():
    g = guard(4)
    with pytest.raises(OutOfPages, match="needs 5 KV pages, 4 free"):
        await g.reserve(5)


async def test_a_cancelled_waiter_takes_nothing_and_the_next_one_gets_the_pages():
    g = guard(2)
    held = await g.reserve(2)
    gone = asyncio.create_task(g.reserve(2))
    await async_wait_until(lambda: g._turn.locked(), 5)
    nxt = asyncio.create_task(g.reserve(2))
    gone.cancel()  # the client went away while its prompt waited for pages
    g.free(held)
    pages = await asyncio.wait_for(nxt, 5)
    assert len(pages) == 2 and g.pool.num_free == 0
    g.free(pages)
    g.pool.check_integrity()
