"""Pages that another thread still touches are freed only once it is done.

A prefill worker hands its pages to other threads: a helper thread copies fetched blocks into
them, hashes them and encodes them; the engine thread computes into them. When the request is
cancelled its coroutine stops waiting, but those threads run on: freeing the pages at once would
let another request reuse them while a stale thread still writes. So each piece of work on
pages is held here until it completes (`hold`, `run`), and `free` releases pages that are
still held only when the last holder is done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pdserve.engine.kv_pool import KVPool, PageId

T = TypeVar("T")


class PageGuard:
    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self._busy: Counter[PageId] = Counter()
        self._deferred: list[list[PageId]] = []
        self._lock = threading.Lock()

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
        self.pool.release(pages)

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
            self.pool.release(pages)
