"""Prefix blocks that requests placed by this gateway are computing now.

When several prompts with one long new prefix arrive together (a burst of one system prompt),
the store has none of it, and every prefill worker they go to would compute the same blocks. A
request whose next blocks, past what the store holds, an earlier request is computing waits for
that request's prefill instead (`FlowSettings.prefix_wait_tokens`), then looks again: the
blocks are in the store, and it computes only the rest (scheduler/replay.py models the same;
README, "Decisions beyond DESIGN.md"). Each gateway knows the requests it placed; prompts
placed by another gateway are computed twice, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pdserve.cache.block_hash import BlockHash


class PrefixFlights:
    """Block key -> the event set when the request computing it is done with its prefill."""

    def __init__(self) -> None:
        self._by_key: dict[BlockHash, asyncio.Event] = {}
        self._claimed: dict[asyncio.Event, list[BlockHash]] = {}  # what each claim holds

    def __len__(self) -> int:
        return len(self._by_key)

    def claim(self, keys: Sequence[BlockHash]) -> asyncio.Event:
        """A request will compute `keys`: those no earlier request is computing become its.
        Returns its event, for `release`."""
        done = asyncio.Event()
        self._claimed[done] = [k for k in keys if self._by_key.setdefault(k, done) is done]
        return done

    def release(self, done: asyncio.Event) -> None:
        """The request's prefill is over (answered or failed): its waiters look again."""
        for k in self._claimed.pop(done, ()):
            self._by_key.pop(k, None)
        done.set()

    def pending(self, keys: Sequence[BlockHash], start: int) -> tuple[int, set[asyncio.Event]]:
        """How many of keys[start:], in order, requests are computing now, and their events."""
        n, events = 0, set()
        for k in keys[start:]:
            e = self._by_key.get(k)
            if e is None:
                break
            events.add(e)
            n += 1
        return n, events
