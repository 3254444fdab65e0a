"""The gateway's table of prefix blocks being computed (services/gateway/prefixes.py)."""

from __future__ import annotations

import asyncio

from pdserve.cache.block_hash import BlockHash
from pdserve.services.gateway.prefixes import PrefixFlights


def keys(*names: str) -> list[BlockHash]:
    return [BlockHash(n.encode()) for n in names]


def test_a_later_request_sees_the_blocks_an_earlier_one_computes_until_it_is_done():
    async def main() -> None:
        f = PrefixFlights()
        first = f.claim(keys("a", "b", "c"))
        assert f.pending(keys("a", "b", "c", "d"), 0) == (3, {first})
        assert f.pending(keys("a", "b", "c", "d"), 1) == (2, {first})
        assert f.pending(keys("x", "a"), 0) == (0, set())  # only a leading run counts
        # A second request claims only what nobody computes yet.
        second = f.claim(keys("a", "b", "c", "d"))
        assert f.pending(keys("a", "b", "c", "d", "e"), 0) == (4, {first, second})
        f.release(first)
        assert first.is_set() and not second.is_set()
        assert f.pending(keys("a", "b", "c", "d"), 0) == (0, set())
        assert f.pending(keys("a", "b", "c", "d"), 3) == (1, {second})
        f.release(first)  # twice: nothing more
        f.release(second)
        assert second.is_set() and len(f) == 0

    asyncio.run(main())


def test_a_waiter_wakes_when_the_request_it_waits_for_is_released():
    async def main() -> None:
        f = PrefixFlights()
        first = f.claim(keys("a", "b"))
        _, events = f.pending(keys("a", "b"), 0)
        assert events == {first} and not first.is_set()
        waiter = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in events)))
        f.release(first)
        await asyncio.wait_for(waiter, 5)

    asyncio.run(main())
