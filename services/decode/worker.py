"""The decode worker: its requests' states (requests.py), the engine that decodes them, driven
by one engine thread, and the NIXL agent their KV lands through.

Threads: the event loop reserves and releases (`reserve`, `release`); the engine thread polls
NIXL notices, lands transfers, expires leases and steps the engine (`_poll`, `_on_events`). The
request table has its own lock; the engine is touched only by its thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from pdserve.engine.engine import LLMEngine
from pdserve.engine.hooks import EngineHooks
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.loader import LoadedModel
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import FinishReason, SamplingParams
from pdserve.engine.sequence import EngineEvent, FailedEvent, FinishEvent, TokenEvent
from pdserve.metrics import DecodeMetrics
from pdserve.services.cpu_share import ThreadGovernor
from pdserve.services.cpu_turns import CpuTurns, TakeTurns
from pdserve.services.decode.requests import DecodeRequest, DecodeRequests, DecodeState
from pdserve.services.engine_thread import EngineThread, group_steps_of
from pdserve.services.outbox import Outbox, Outboxes, RequestFailed
from pdserve.services.transfer import NixlEndpoint, pages_checksum
from pdserve.services.worker import new_epoch
from pdserve.startup import phase
from pdserve.v1 import common_pb2

log = logging.getLogger(__name__)

# An idle worker waiting for a KV transfer polls for its notice this often (a stepping one
# polls between steps). Each wake takes a core from the prefill computing that KV when they
# share a machine: at 1 ms, a warm 2,048-token prompt's TTFT was 15 ms longer (median of 4,
# pdserve up on 2 cores); the cost is at most this long before the second token.
POLL_BUSY_S = 0.005
POLL_IDLE_S = 0.05   # nothing can land before a reservation, which wakes the thread


def _ends(e: EngineEvent) -> bool:
    return not isinstance(e, TokenEvent) or e.finish_reason is not None


class DecodeWorker:
    def __init__(self, loaded: LoadedModel, num_pages: int, max_batch: int, lease_s: float,
                 device: str = "cpu", agent_name: str = "decode", quarantine_s: float = 60.0,
                 turns: CpuTurns | None = None, adapt_threads: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 wrap_hooks: Callable[[EngineHooks], EngineHooks] | None = None) -> None:
        """`wrap_hooks`: what a rank of an EP group puts around the worker's engine hooks
        (services/worker.py, ep_hooks); `adapt_threads`: fewer OpenMP threads while other work
        holds the cores (services/cpu_share.py)."""
        self.loaded = loaded
        self.epoch = new_epoch()
        self.pool = KVPool(loaded.layout, num_pages, device)
        phase("KV pool allocation")
        self.governor = ThreadGovernor() if adapt_threads else None
        hooks: EngineHooks = TakeTurns(turns or CpuTurns(None), self.governor)
        hooks = wrap_hooks(hooks) if wrap_hooks is not None else hooks
        self.engine = LLMEngine(ModelRunner(loaded.model, self.pool), max_batch=max_batch,
                                hooks=hooks)
        self.requests = DecodeRequests(self.pool, lease_s, quarantine_s, clock)
        self.outboxes = Outboxes()
        self.endpoint = NixlEndpoint(f"{agent_name}-{self.epoch}", self.pool)
        phase("NIXL registration")
        self._metadata = self.endpoint.metadata
        self.thread = EngineThread(self.engine, self.outboxes, name="decode-engine",
                                   on_events=self._on_events, poll=self._poll,
                                   group_steps=group_steps_of(hooks))
        self.draining = False
        self.on_change: Callable[[], None] | None = None  # thread-safe "report load now"
        self.metrics: DecodeMetrics | None = None

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    def export_metrics(self, m: DecodeMetrics) -> None:
        self.metrics = m
        if (g := self.governor) is not None:
            m.threads.set_function(lambda: g.threads)
        m.watch_pool(self.pool)
        m.running.set_function(lambda: self.requests.count(DecodeState.RUNNING))
        m.waiting.set_function(lambda: self.requests.count(DecodeState.RESERVED))
        m.quarantined.set_function(lambda: self.requests.quarantined_pages)

    @property
    def lease_s(self) -> float:
        return self.requests.lease_s

    # -- event loop ------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.stop()

    def reserve(self, request_id: str, prompt: list[int], params: SamplingParams,
                loop: asyncio.AbstractEventLoop) -> common_pb2.Reservation:
        """Pages for the request (AlreadyExists, OutOfPages), with the NIXL descriptors a
        prefill worker WRITEs its KV into."""
        req = self.requests.reserve(request_id, prompt, params)
        self.outboxes.open(request_id, loop, claimed=False)  # the Stream claims it
        self.thread.wake()
        self._notify_change()
        pages = req.seq.pages
        return common_pb2.Reservation(
            request_id=request_id, epoch=self.epoch, agent_name=self.endpoint.name,
            agent_metadata=self._metadata, mem_type=self.endpoint.mem_type,
            page_ids=pages, pages=self.endpoint.descriptors(pages),
            layout_fingerprint=self.loaded.layout.fingerprint(), lease_s=self.lease_s)

    def renew(self, request_id: str, epoch: int) -> bool:
        """Another lease from now for a reservation of this worker's epoch still waiting for
        its KV (DecodeRequests.renew)."""
        return epoch == self.epoch and self.requests.renew(request_id)

    def outbox(self, request_id: str) -> Outbox | None:
        """The request's outbox for its Stream (also one that ended a moment before)."""
        return self.outboxes.claim(request_id)

    def release(self, request_id: str, unwritten: bool = False) -> bool:
        """Frees whatever the request holds and ends its stream (`abort`); `unwritten`: the
        caller never gave the reservation to a prefill worker, so no quarantine."""
        was = self.requests.release(request_id, unwritten)
        if was is None:
            return False
        if was is DecodeState.RUNNING:
            self.thread.post(lambda: self.engine.abort(request_id))
        box = self.outboxes.close(request_id)
        if box is not None:
            box.put(FinishEvent(request_id, FinishReason.ABORT))
        self._notify_change()
        return True

    def report(self) -> common_pb2.LoadReport:
        r = self.requests
        return common_pb2.LoadReport(
            free_pages=self.pool.num_free, total_pages=self.pool.num_pages,
            running=r.count(DecodeState.RUNNING), waiting=r.count(DecodeState.RESERVED),
            num_finished=r.num_finished, draining=self.draining)

    @property
    def busy(self) -> bool:
        return self.requests.busy

    # -- engine thread ---------------------------------------------------------------------------
    def _poll(self) -> float:
        for notice in self.endpoint.poll_notices():
            self._land(notice)
        expired, freed = self.requests.expire()
        for req in expired:
            self._failed(req)
        if expired or freed:
            self._notify_change()
        return POLL_BUSY_S if self.requests.waiting_for_kv else POLL_IDLE_S

    def _land(self, notice: common_pb2.TransferNotice) -> None:
        req = self.requests.land(notice, self.epoch,
                                 lambda pages: pages_checksum(self.pool, pages))
        if req is None:
            log.warning("transfer notice for no pending request dropped",
                        extra={"request_id": notice.request_id, "epoch": notice.epoch})
            return
        if req.state is DecodeState.FAILED:
            self._failed(req)
            self._notify_change()
            return
        if (m := self.metrics) is not None:
            n = self.pool.layout.pages_for(len(req.seq.prompt))
            m.transfer_bytes.inc(n * self.pool.page_nbytes)
            m.transfer_seconds.observe(time.monotonic() - req.reserved_at)
        done = self.engine.add_prefilled(req.seq)
        if done is not None:
            self._on_events([done])

    def _failed(self, req: DecodeRequest) -> None:
        assert req.error is not None
        if self.metrics is not None:
            self.metrics.failed.labels(req.error.code.name).inc()
        box = self.outboxes.close(req.request_id)
        if box is not None:
            box.put(RequestFailed(req.error))

    def _on_events(self, events: list[EngineEvent]) -> None:
        if self.metrics is not None:
            self.metrics.tokens.inc(sum(isinstance(e, TokenEvent) for e in events))
        self.outboxes.deliver((e.request_id, e) for e in events)
        ended = [e for e in events if _ends(e)]
        for e in ended:
            self.requests.finish(e.request_id)
            self.outboxes.close(e.request_id)
            if isinstance(e, FailedEvent) and self.metrics is not None:
                self.metrics.failed.labels("INTERNAL").inc()
        if ended:
            self._notify_change()

    def _notify_change(self) -> None:
        if self.on_change is not None:
            self.on_change()
