"""A prefill worker's compute: its prompts and pipeline stages go through one engine
(engine/engine.py), driven by one engine thread (services/engine_thread.py), which batches the
prompt chunks of several requests into each step (chunked prefill).

The engine hooks here (`PrefillHooks`) connect it to the layer-wise fetch of cached blocks
(layer_fetch.py): a prompt may start computing while the KV of its cached prefix is still
arriving; the forward waits before each layer for that layer's part; a prompt still fetching
runs only when nothing else is ready; and a prefix that did not all arrive verified is
recomputed from its last good block. They also take the worker's CPU turns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from pdserve.engine.scheduler import ScheduledBatch
from pdserve.engine.sequence import FailedEvent, Sequence, TokenEvent
from pdserve.services.cpu_turns import CpuTurns, TakeTurns
from pdserve.services.engine_thread import EngineThread
from pdserve.services.errors import Internal
from pdserve.services.outbox import Outbox
from pdserve.services.prefill.guard import PageGuard
from pdserve.services.prefill.layer_fetch import LayerLoad


class PrefillHooks(TakeTurns):
    def __init__(self, turns: CpuTurns) -> None:
        super().__init__(turns)
        # Cached blocks still arriving, by request id: set when a called prompt is unparked,
        # dropped after its first step (`settle`) or when it leaves.
        self.loads: dict[str, LayerLoad] = {}

    def ready(self, seq: Sequence) -> bool:
        load = self.loads.get(seq.request_id)
        return load is None or load.settled

    def before_layer(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        loads = [ld for s in batch.seqs if (ld := self.loads.get(s.request_id)) is not None]
        if not loads:
            return None

        def wait(layer: int) -> None:
            for load in loads:
                load.wait(layer)
        return wait

    def settle(self, seq: Sequence) -> int | None:
        load = self.loads.pop(seq.request_id, None)
        # The forward waited through its last layer, so the fetch has settled.
        return None if load is None else load.good_tokens


class Compute:
    def __init__(self, thread: EngineThread, hooks: PrefillHooks, guard: PageGuard) -> None:
        self.thread = thread
        self.hooks = hooks
        self.guard = guard

    @contextlib.asynccontextmanager
    async def submit(self, seq: Sequence) -> AsyncIterator[Outbox]:
        """Adds `seq` to the engine and yields the outbox of its events. On exit the sequence is
        taken out of the engine if it is still there, and its pages stay held (PageGuard) until
        that is done."""
        rid = seq.request_id
        box = self.thread.outboxes.open(rid, asyncio.get_running_loop())
        engine = self.thread.engine
        self.thread.post(lambda: engine.add(seq))
        try:
            yield box
        finally:
            self.thread.outboxes.close(rid)
            self.hooks.loads.pop(rid, None)
            self.guard.hold(seq.pages, self.thread.call(lambda: engine.abort(rid)))

    @contextlib.asynccontextmanager
    async def park(self, seq: Sequence) -> AsyncIterator[tuple[Outbox, asyncio.Future[None]]]:
        """`submit` for a prompt without pages yet: it takes its place in the engine's order
        now (parked) and the future is done when the engine calls it (its turn is about a
        step away, engine/scheduler.py); then the caller gives it pages (seq.pages) and
        `unpark`s it."""
        loop = asyncio.get_running_loop()
        called: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not called.done():
                called.set_result(None)

        def on_call() -> None:  # on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(wake)
        seq.parked, seq.on_call = True, on_call
        async with self.submit(seq) as box:
            yield box, called

    def unpark(self, seq: Sequence, num_computed: int, load: LayerLoad | None = None) -> None:
        """A called prompt runs in its turn from now on: its pages are seq.pages, the KV of
        its first `num_computed` positions in them (with `load`: on its way)."""
        if load is not None:
            self.hooks.loads[seq.request_id] = load
        engine = self.thread.engine
        self.thread.post(lambda: engine.unpark(seq.request_id, num_computed))

    async def first_token(self, seq: Sequence) -> TokenEvent:
        """Computes the prompt from seq.num_computed (its KV before that in its pages) and
        returns its first token."""
        async with self.submit(seq) as box:
            return await self.token(box)

    @staticmethod
    async def token(box: Outbox) -> TokenEvent:
        """The first token from a prompt's outbox."""
        msg = await box.get()
        if isinstance(msg, FailedEvent):
            raise Internal(f"prefill step failed: {msg.error}")
        assert isinstance(msg, TokenEvent), msg
        return msg
