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

    def put(self, msg: OutboxMessage) -> None:
        """From any thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, msg)

    async def get(self) -> OutboxMessage:
        return await self.queue.get()


def _put_all(items: list[tuple[Outbox, OutboxMessage]]) -> None:
    for outbox, msg in items:
        outbox.queue.put_nowait(msg)


class Outboxes:
    """The outboxes of one worker's requests, by request id (thread-safe)."""

    def __init__(self) -> None:
        self._boxes: dict[str, Outbox] = {}
        self._lock = threading.Lock()

    def open(self, request_id: str, loop: asyncio.AbstractEventLoop) -> Outbox:
        with self._lock:
            if request_id in self._boxes:
                raise KeyError(request_id)
            box = self._boxes[request_id] = Outbox(loop)
        return box

    def get(self, request_id: str) -> Outbox | None:
        return self._boxes.get(request_id)

    def close(self, request_id: str) -> Outbox | None:
        with self._lock:
            return self._boxes.pop(request_id, None)

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
