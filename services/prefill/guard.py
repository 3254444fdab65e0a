"""Pages that another thread still touches are freed only once it is done.

A prefill worker hands its pages to other threads: a helper thread copies fetched blocks into
them, hashes them and encodes them; the engine thread computes into them. When the request is
cancelled its coroutine stops waiting, but those threads run on: freeing the pages at once would
let another request reuse them while a stale thread still writes. So each piece of work on
pages is held here until it completes (`hold`, `run`), and `free` releases pages that are
still held only when the last holder is done.

A request's pages come from here too (`reserve`): a prompt that finds too few free waits for
the pages of those before it, first come first served, instead of failing (a burst larger
than the pool queues here, then in the engine's deadline order).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
        self._turn = asyncio.Lock()  # FIFO: the first waiter for pages takes the next freed
        self._freed: asyncio.Event | None = None  # set (on its loop) whenever pages are freed
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_waited = 0  # requests that waited for pages
        self.on_wait: Callable[[], None] | None = None  # called for each of them (a metric)

    async def reserve(self, n: int) -> list[PageId]:
        """`n` pages of the pool, waiting while fewer are free (first come first served);
        OutOfPages at once if the pool could never hold them."""
        if n > self.pool.num_pages:
            raise OutOfPages(n, self.pool.num_pages)
        waited = self._turn.locked()  # behind another waiter
        async with self._turn:
            while True:
                if self._freed is None:
                    self._loop, self._freed = asyncio.get_running_loop(), asyncio.Event()
                self._freed.clear()
                try:
                    pages = self.pool.reserve(n)
                except OutOfPages:
                    waited = True
                    await self._freed.wait()
                    continue
                if waited:
                    self.num_waited += 1
                    if self.on_wait is not None:
                        self.on_wait()
                return pages

    def _release(self, pages: list[PageId]) -> None:
        self.pool.release(pages)
        loop, freed = self._loop, self._freed
        if loop is not None and freed is not None and not loop.is_closed():
            loop.call_soon_threadsafe(freed.set)

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
