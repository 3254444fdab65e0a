"""Where an engine thread leaves a request's results for the RPC that waits for them.

Each request has an `Outbox`: an asyncio queue on the RPC's event loop. The engine thread puts
typed messages in it (the engine's events, engine/sequence.py, and `RequestFailed` for what
fails outside the engine: a bad transfer, an expired lease), never on the loop's thread: all
messages of one step go to the loop in one `call_soon_threadsafe` (`Outboxes.deliver`), since
every wake-up of the loop makes it take the GIL, which the engine thread then waits to get back.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from pdserve.engine.sequence import EngineEvent
from pdserve.services.errors import ServiceError


@dataclass(frozen=True)
class RequestFailed:
    """The request failed outside the engine; the RPC answers with the error's status."""

    error: ServiceError


OutboxMessage = EngineEvent | RequestFailed


@dataclass
class Outbox:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[OutboxMessage] = field(default_factory=asyncio.Queue)
    claimed: bool = True  # an RPC reads it (else: kept a while after the request ends)

    def put(self, msg: OutboxMessage) -> None:
        """From any thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, msg)

    async def get(self) -> OutboxMessage:
        return await self.queue.get()


def _put_all(items: list[tuple[Outbox, OutboxMessage]]) -> None:
    for outbox, msg in items:
        outbox.queue.put_nowait(msg)


class Outboxes:
    """The outboxes of one worker's requests, by request id (thread-safe).

    A box opened unclaimed (the RPC that reads it comes later: a decode worker's Stream) and
    closed before any RPC claimed it keeps its messages for `linger_s` (at most `max_ended`
    such boxes): a request that ended before its reader arrived (one token, under load) is
    still read whole, instead of answering that it has no reservation."""

    def __init__(self, linger_s: float = 60.0, max_ended: int = 4096) -> None:
        self._boxes: dict[str, Outbox] = {}
        self._ended: OrderedDict[str, tuple[Outbox, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.linger_s, self.max_ended = linger_s, max_ended

    def open(self, request_id: str, loop: asyncio.AbstractEventLoop,
             claimed: bool = True) -> Outbox:
        with self._lock:
            if request_id in self._boxes:
                raise KeyError(request_id)
            self._ended.pop(request_id, None)
            box = self._boxes[request_id] = Outbox(loop, claimed=claimed)
        return box

    def get(self, request_id: str) -> Outbox | None:
        return self._boxes.get(request_id)

    def claim(self, request_id: str) -> Outbox | None:
        """The request's box for the RPC that reads it: open, or ended unread a moment ago."""
        with self._lock:
            box = self._boxes.get(request_id)
            if box is None:
                box, _ = self._ended.pop(request_id, (None, 0.0))
            if box is not None:
                box.claimed = True
            return box

    def close(self, request_id: str) -> Outbox | None:
        with self._lock:
            box = self._boxes.pop(request_id, None)
            now = time.monotonic()
            if box is not None and not box.claimed:
                self._ended[request_id] = (box, now)
            while self._ended and (len(self._ended) > self.max_ended
                                   or next(iter(self._ended.values()))[1] < now - self.linger_s):
                self._ended.popitem(last=False)
            return box

    def __len__(self) -> int:
        return len(self._boxes)

    def deliver(self, messages: Iterable[tuple[str, OutboxMessage]]) -> None:
        """Puts each (request id, message) in its request's outbox (dropped when the request
        has none any more), one wake-up per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Outbox, OutboxMessage]]] = {}
        for rid, msg in messages:
            box = self._boxes.get(rid)
            if box is not None:
                by_loop.setdefault(box.loop, []).append((box, msg))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)
