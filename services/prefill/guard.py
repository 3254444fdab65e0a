"""Pages that another thread still touches are freed only once it is done.

A prefill worker hands its pages to other threads: a helper thread copies fetched blocks into
them, hashes them and encodes them; the engine thread computes into them. When the request is
cancelled its coroutine stops waiting, but those threads run on: freeing the pages at once would
let another request reuse them while a stale thread still writes. So each piece of work on
pages is held here until it completes (`hold`, `run`), and `free` releases pages that are
still held only when the last holder is done.

A request's pages come from here too (`reserve`): a prompt that finds too few free waits for
the pages of those before it instead of failing, earliest due first as in the engine's order.
A whole prompt asks only once the engine calls it (its turn about a step away: a burst larger
than the pool queues in the engine's order, holding no pages); a pipeline's head asks on
arrival.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pdserve.engine.errors import OutOfPages
from pdserve.engine.kv_pool import KVPool, PageId

T = TypeVar("T")


class PageGuard:
    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self._busy: Counter[PageId] = Counter()
        self._deferred: list[list[PageId]] = []
        self._lock = threading.Lock()
        # Requests waiting for pages, earliest due first: (due, arrival number, pages wanted,
        # the future their pages are handed to). Granted on the event loop only.
        self._waiting: list[tuple[float, int, int, asyncio.Future[list[PageId]]]] = []
        self._numbers = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_waited = 0  # requests that waited for pages
        self.on_wait: Callable[[], None] | None = None  # called for each of them (a metric)

    async def reserve(self, n: int, due: float = 0.0) -> list[PageId]:
        """`n` pages of the pool. While fewer are free, or a request due before `due` (then
        one that came first) waits for pages, it waits: the earliest due takes the next pages
        freed, and none passes it, so a large prompt is not starved by smaller ones. OutOfPages
        at once if the pool could never hold them."""
        if n > self.pool.num_pages:
            raise OutOfPages(n, self.pool.num_pages)
        self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[PageId]] = self._loop.create_future()
        heapq.heappush(self._waiting, (due, next(self._numbers), n, fut))
        self._grant()
        if not fut.done():
            self.num_waited += 1
            if self.on_wait is not None:
                self.on_wait()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted as its caller went away
                self._release(fut.result())
            raise

    def _grant(self) -> None:
        """Pages to the waiting requests in their order, while the first one's fit."""
        while self._waiting:
            _, _, n, fut = self._waiting[0]
            if fut.done():  # its caller went away
                heapq.heappop(self._waiting)
                continue
            try:
                pages = self.pool.reserve(n)
            except OutOfPages:
                return
            heapq.heappop(self._waiting)
            fut.set_result(pages)

    def _release(self, pages: list[PageId]) -> None:
        self.pool.release(pages)
        loop = self._loop
        if loop is not None and self._waiting and not loop.is_closed():
            loop.call_soon_threadsafe(self._grant)

    def hold(self, pages: Sequence[PageId],
             until: asyncio.Future[Any] | concurrent.futures.Future[Any]) -> None:
        """The pages are in use until `until` is done."""
        held = list(pages)
        with self._lock:
            self._busy.update(held)
        until.add_done_callback(lambda _: self._done(held))

    async def run(self, fn: Callable[..., T], *args: Any, pages: Sequence[PageId]) -> T:
        """fn(*args) in a helper thread, holding `pages` until it returns. A cancelled caller
        stops waiting; the thread runs on, and the pages stay held."""
        fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self.hold(pages, fut)
        return await asyncio.shield(fut)

    def free(self, pages: list[PageId]) -> None:
        """Releases the pages now, or when the last work holding them is done."""
        with self._lock:
            if any(self._busy[p] for p in pages):
                self._deferred.append(pages)
                return
        self._release(pages)

    @property
    def num_deferred(self) -> int:
        return len(self._deferred)

    def _done(self, held: list[PageId]) -> None:
        with self._lock:
            self._busy.subtract(held)
            self._busy += Counter()  # drop zero counts
            ready = [p for p in self._deferred if not any(self._busy[x] for x in p)]
            for pages in ready:
                self._deferred.remove(pages)
        for pages in ready:
            self._release(pages)
