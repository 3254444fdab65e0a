"""One engine driven from one thread: every step, and every change to the engine's sequences,
happens on it.

Why one thread: libgomp keeps an OpenMP team per thread that ran a parallel region, and a
decode step is thousands of small regions (services/worker.py, `in_passing_thread`); and with
all changes made on the thread that steps, the engine needs no lock. Other threads `post` a
change (or `call` it and wait for its result) and `wake` the thread.

Lifecycle: `start` -> `post`/`call`/`run` from any thread -> `stop` (safe twice, and before
`start`). Each turn of the loop:
1. run the posted changes (adds, aborts);
2. `poll` (a decode worker reads its NIXL notices, expires leases); it returns how long the
   thread may sleep when there is nothing to compute;
3. nothing to compute: sleep until woken or that long;
4. just woken from idle with work, a `GatherPolicy` may hold the first step a little for more
   work to arrive (a burst of prompts prefilled in one step, not the first alone);
5. one `engine.step()`; its events go to `on_events` (by default: the requests' outboxes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pdserve.engine.engine import LLMEngine
from pdserve.engine.sequence import EngineEvent
from pdserve.services.outbox import Outboxes

log = logging.getLogger(__name__)

T = TypeVar("T")
IDLE_WAIT_S = 0.5  # an idle thread with no poll still looks at its stop flag this often
GROUP_POLL_S = 0.005  # an idle EP group agrees on its next step this often


@dataclass(frozen=True)
class GatherPolicy:
    """An engine just woken from idle waits up to `wait_s` for more work before its first step,
    unless a whole step's worth of tokens (`budget_tokens`) is queued already."""

    wait_s: float
    budget_tokens: int

    def wait_left(self, woke_at: float, now: float, queued_tokens: int) -> float:
        """Seconds still to wait (0: step now)."""
        if queued_tokens >= self.budget_tokens:
            return 0.0
        return max(0.0, woke_at + self.wait_s - now)


class EngineStopped(RuntimeError):
    """The engine thread stopped before a change posted to it ran."""


class EngineThread:
    def __init__(self, engine: LLMEngine, outboxes: Outboxes, *, name: str,
                 on_events: Callable[[list[EngineEvent]], None] | None = None,
                 poll: Callable[[], float] | None = None,
                 gather: GatherPolicy | None = None,
                 group_steps: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`group_steps`: for a rank of an EP group, the group's step count (engine/ep/hooks.py):
        the thread then steps even with nothing of its own (the step agreement decides whether
        the group steps), and waits GROUP_POLL_S between agreements while no rank has work."""
        self.engine = engine
        self.outboxes = outboxes
        self.name = name
        self._on_events = on_events or self.deliver
        self._poll = poll
        self._gather = gather if gather is not None and gather.wait_s > 0 else None
        self._clock = clock
        self._group_steps = group_steps
        self._posted: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any] | None]] = (
            deque())
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- from any thread ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        self._cancel_posted()

    def wake(self) -> None:
        self._wake.set()

    def post(self, fn: Callable[[], Any]) -> None:
        """Runs fn on the engine thread before its next step; its result is dropped (an
        exception is logged)."""
        self._posted.append((fn, None))
        self._wake.set()

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Runs fn on the engine thread before its next step; the future has its result."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self._stop.is_set():
            fut.set_exception(EngineStopped(f"{self.name} stopped"))
            return fut
        self._posted.append((fn, fut))
        self._wake.set()
        return fut

    async def run(self, fn: Callable[[], T]) -> T:
        """`call` awaited from an event loop."""
        return await asyncio.wrap_future(self.call(fn))

    def deliver(self, events: list[EngineEvent]) -> None:
        self.outboxes.deliver((e.request_id, e) for e in events)

    # -- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        idle = True
        while not self._stop.is_set():
            self._wake.clear()
            self._run_posted()
            sleep = self._poll_once()
            if self._group_steps is not None:  # a rank of an EP group
                before = self._group_steps()
                events = self.engine.step()
                if events:
                    self._on_events(events)
                if self._group_steps() == before:  # no rank had work
                    self._wake.wait(min(sleep, GROUP_POLL_S))
                continue
            if not self.engine.has_work:
                idle = True
                self._wake.wait(sleep)
                continue
            if idle:
                idle = False
                self._hold_for_more(self._clock())
                if self._stop.is_set():
                    break
            events = self.engine.step()
            if events:
                self._on_events(events)
        self._cancel_posted()

    def _poll_once(self) -> float:
        if self._poll is None:
            return IDLE_WAIT_S
        try:
            return self._poll()
        except Exception:
            log.exception("engine poll failed", extra={"thread": self.name})
            return IDLE_WAIT_S

    def _hold_for_more(self, woke_at: float) -> None:
        if self._gather is None:
            return
        waiting = self.engine.waiting
        if waiting and not any(self.engine.hooks.ready(s) for s in waiting):
            return  # only prompts whose cached KV is still arriving: they wait for it anyway
        while not self._stop.is_set():
            self._wake.clear()
            self._run_posted()
            left = self._gather.wait_left(woke_at, self._clock(),
                                          self.engine.scheduler.queued_tokens)
            if left <= 0:
                return
            self._wake.wait(left)

    def _run_posted(self) -> None:
        while self._posted:
            fn, fut = self._posted.popleft()
            if fut is not None and not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as e:
                if fut is not None:
                    fut.set_exception(e)
                else:
                    log.exception("engine change failed", extra={"thread": self.name})
                continue
            if fut is not None:
                fut.set_result(result)

    def _cancel_posted(self) -> None:
        while self._posted:
            _, fut = self._posted.popleft()
            if fut is not None and not fut.done():
                fut.set_exception(EngineStopped(f"{self.name} stopped"))


def group_steps_of(hooks: object) -> Callable[[], int] | None:
    """The group's step count when `hooks` are an EP group's (engine/ep/hooks.py), else None."""
    from pdserve.engine.ep.hooks import EPHooks

    return hooks.group_steps if isinstance(hooks, EPHooks) else None
