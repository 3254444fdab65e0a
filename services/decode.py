"""The decode service: reserves KV pages, receives prompt KV over NIXL, streams tokens.

Lifecycle of one request:
1. `Reserve`: pages for prompt + max_tokens are set aside (RESOURCE_EXHAUSTED if they do not
   fit) and returned as NIXL descriptors with this worker's agent metadata and epoch.
2. The prefill worker WRITEs the prompt's pages and sends a `TransferNotice` (first token,
   checksum of the written bytes).
3. The engine thread picks the notice up, checks epoch, token count and checksum, and only then
   starts decoding; a bad transfer fails the request (DATA_LOSS) and frees its pages; no notice
   within the lease fails it (DEADLINE_EXCEEDED) and frees its pages; a late notice is dropped.
4. `Stream` yields tokens after the first as the continuous batch produces them.
5. Finish (stop token / max_tokens), `Release`, or a cancelled stream frees the pages.

Startup: load model, allocate pool, register it with NIXL, serve, join the gateway.
Shutdown: NOT_SERVING, stop the engine thread, stop the server.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from pdserve.engine.engine import LLMEngine, TokenEvent, pages_needed
from pdserve.engine.errors import OutOfPages
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.loader import LoadedModel
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import Sequence
from pdserve.services import security
from pdserve.services.cpu_turns import CpuTurns
from pdserve.services.registration import join_gateway
from pdserve.services.server import SERVING, create_server, serve_until_signal, write_ready_file
from pdserve.services.transfer import NixlEndpoint, pages_checksum
from pdserve.services.worker import (
    advertised_address,
    in_passing_thread,
    load_for,
    new_epoch,
    sampling_from_proto,
    worker_info,
)
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from prometheus_client import CollectorRegistry

from pdserve.config import DecodeSettings
from pdserve.metrics import WorkerMetrics, serve_metrics

log = logging.getLogger(__name__)


@dataclass
class Outbox:
    """Where the engine thread puts a request's results for its Stream RPC to read."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: tuple) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver(items: list[tuple[Outbox, tuple]]) -> None:
    for outbox, item in items:
        outbox.queue.put_nowait(item)


@dataclass
class Pending:
    seq: Sequence
    deadline: float
    outbox: Outbox
    reserved_at: float = 0.0


class DecodeWorker:
    def __init__(self, loaded: LoadedModel, num_pages: int, max_batch: int, lease_s: float,
                 device: str = "cpu", agent_name: str = "decode",
                 quarantine_s: float = 60.0, turns: CpuTurns | None = None) -> None:
        self.turns = turns or CpuTurns(None)  # co-located workers take turns on the cores
        self.loaded = loaded
        self.epoch = new_epoch()
        self.pool = KVPool(loaded.layout, num_pages, device)
        self.engine = LLMEngine(ModelRunner(loaded.model, self.pool), max_batch=max_batch)
        self.lease_s = lease_s
        self.endpoint = NixlEndpoint(f"{agent_name}-{self.epoch}", self.pool)
        self._metadata = self.endpoint.metadata
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}
        self._outboxes: dict[str, Outbox] = {}
        self._stop = threading.Event()
        self._work = threading.Event()  # set by reserve(): the idle engine thread wakes up
        self._thread: threading.Thread | None = None
        self.num_finished = 0
        self.num_failed = 0
        self.draining = False
        self.on_change: Callable[[], None] | None = None  # thread-safe "report load now"
        self.metrics: WorkerMetrics | None = None
        # Pages of reservations that ended before their KV landed: a slow prefill may still be
        # WRITing into them, so they are reused only after the writer's deadline has passed.
        self.quarantine_s = quarantine_s
        self._quarantine: list[tuple[float, list[int]]] = []
        self.quarantined_pages = 0

    def export_metrics(self, m: WorkerMetrics) -> None:
        self.metrics = m
        m.pages_total.set_function(lambda: self.pool.num_pages)
        m.pages_used.set_function(lambda: self.pool.num_pages - self.pool.num_free)
        m.pages_usage.set_function(lambda: 1 - self.pool.num_free / self.pool.num_pages)
        m.running.set_function(lambda: len(self.engine.running))
        m.waiting.set_function(lambda: len(self._pending))
        m.quarantined.set_function(lambda: self.quarantined_pages)

    # -- RPC side (event loop thread) ----------------------------------------------------------
    def reserve(self, request_id: str, prompt: list[int], params: SamplingParams,
                loop: asyncio.AbstractEventLoop) -> common_pb2.Reservation:
        seq = Sequence(request_id, prompt, params)
        with self._lock:
            if request_id in self._outboxes:
                raise ValueError(f"request_id {request_id!r} is already reserved here")
            seq.pages = self.pool.reserve(pages_needed(self.pool, len(prompt), params.max_tokens))
            outbox = Outbox(loop)
            self._pending[request_id] = Pending(seq, time.monotonic() + self.lease_s, outbox,
                                                time.monotonic())
            self._outboxes[request_id] = outbox
        self._work.set()
        return common_pb2.Reservation(
            request_id=request_id, epoch=self.epoch, agent_name=self.endpoint.name,
            agent_metadata=self._metadata, mem_type=self.endpoint.mem_type,
            page_ids=seq.pages, pages=self.endpoint.descriptors(seq.pages),
            layout_fingerprint=self.loaded.layout.fingerprint(), lease_s=self.lease_s,
        )

    def outbox(self, request_id: str) -> Outbox | None:
        return self._outboxes.get(request_id)

    def release(self, request_id: str) -> bool:
        with self._lock:
            found = self._drop(request_id)
        return found

    def _drop(self, request_id: str) -> bool:
        """Frees whatever the request holds and ends its stream. Caller holds the lock."""
        outbox = self._outboxes.pop(request_id, None)
        p = self._pending.pop(request_id, None)
        if p is not None:
            self._hold(p)
            found = True
        else:
            found = self.engine.abort(request_id)
        if outbox is not None:
            outbox.put(("token", -1, "abort", None))
        self._notify_change()
        return found

    def load(self) -> common_pb2.LoadReport:
        return common_pb2.LoadReport(
            free_pages=self.pool.num_free, total_pages=self.pool.num_pages,
            running=len(self.engine.running), waiting=len(self._pending),
            num_finished=self.num_finished, draining=self.draining)

    @property
    def busy(self) -> bool:
        return bool(self._pending or self.engine.running)

    # -- engine thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="decode-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._work.clear()
            if self.poll_once():
                continue
            if self._pending or self._quarantine:
                time.sleep(0.001)  # a KV transfer may land any moment: poll for its notice
            else:
                # Idle: nothing can land before a reservation, which sets _work. (A worker
                # polling a thousand times a second took CPU from the workers beside it.)
                self._work.wait(0.05)

    def poll_once(self) -> bool:
        for notice in self.endpoint.poll_notices():
            self._land(notice)
        self._expire(time.monotonic())
        with self._lock:
            if not self.engine.running:
                return False
        with self.turns.decode():  # not under self._lock: handlers need it meanwhile
            with self._lock:
                if not self.engine.running:
                    return False
                events = self.engine.step()
        self._dispatch(events)
        return True

    def _fail(self, p: Pending, code: grpc.StatusCode, message: str) -> None:
        """Caller holds the lock."""
        self.pool.release(p.seq.pages)
        p.seq.pages = []
        self._outboxes.pop(p.seq.request_id, None)
        self.num_failed += 1
        if self.metrics is not None:
            self.metrics.failed.labels(code.name).inc()
        p.outbox.put(("error", code, message))
        self._notify_change()

    def _land(self, notice: common_pb2.TransferNotice) -> None:
        with self._lock:
            p = self._pending.get(notice.request_id)
            if p is None or notice.epoch != self.epoch:
                log.warning("transfer notice for no pending request dropped",
                            extra={"request_id": notice.request_id, "epoch": notice.epoch})
                return
            del self._pending[notice.request_id]
            seq = p.seq
            n = self.pool.layout.pages_for(len(seq.prompt))
            if notice.num_prompt_tokens != len(seq.prompt):
                self._fail(p, grpc.StatusCode.DATA_LOSS,
                           f"KV transfer covers {notice.num_prompt_tokens} tokens, "
                           f"prompt has {len(seq.prompt)}")
                return
            if pages_checksum(self.pool, seq.pages[:n]) != notice.kv_checksum:
                self._fail(p, grpc.StatusCode.DATA_LOSS, "KV transfer checksum mismatch")
                return
            seq.output.append(notice.first_token)
            if (m := self.metrics) is not None:
                m.transfer_bytes.inc(n * self.pool.page_nbytes)
                m.transfer_seconds.observe(time.monotonic() - p.reserved_at)
            done = self.engine.add_prefilled(seq)
        if done is not None:
            self._dispatch([done])

    def _expire(self, now: float) -> None:
        with self._lock:
            for rid, p in list(self._pending.items()):
                if now > p.deadline:
                    del self._pending[rid]
                    self._hold(p)
                    self._fail(p, grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"KV transfer did not arrive within the {self.lease_s:g} s lease")
            if self._quarantine and self._quarantine[0][0] <= now:
                keep = []
                for until, pages in self._quarantine:
                    if until <= now:
                        self.pool.release(pages)
                        self.quarantined_pages -= len(pages)
                    else:
                        keep.append((until, pages))
                self._quarantine = keep
                self._notify_change()

    def _hold(self, p: Pending) -> None:
        """Quarantines a pending reservation's pages until no prefill may write them any more:
        a prefill starts a WRITE only within the lease and gives up after its transfer timeout.
        Caller holds the lock."""
        if p.seq.pages:
            until = p.reserved_at + self.lease_s + self.quarantine_s
            self._quarantine.append((until, p.seq.pages))
            self._quarantine.sort(key=lambda q: q[0])
            self.quarantined_pages += len(p.seq.pages)
            p.seq.pages = []

    def _dispatch(self, events: list[TokenEvent]) -> None:
        if self.metrics is not None:
            self.metrics.tokens.inc(len(events))
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[Outbox, tuple]]] = {}
        finished = False
        for ev in events:
            outbox = self._outboxes.get(ev.request_id)
            if ev.finish_reason is not None:
                self._outboxes.pop(ev.request_id, None)
                self.num_finished += 1
                finished = True
            if outbox is not None:
                deliveries.setdefault(outbox.loop, []).append(
                    (outbox, ("token", ev.token, ev.finish_reason, ev.logprob)))
        # One wake-up of the event loop per step, not one per token: each wake-up makes the
        # loop thread take the GIL, which the engine thread then waits to get back.
        for loop, items in deliveries.items():
            loop.call_soon_threadsafe(_deliver, items)
        if finished:
            self._notify_change()

    def _notify_change(self) -> None:
        if self.on_change is not None:
            self.on_change()


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: DecodeWorker) -> None:
        self.worker = worker

    async def Reserve(self, request, context):
        w = self.worker
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: empty")
        if len(request.request_id) > 512:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request_id: {len(request.request_id)} characters, limit 512")
        if not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids: empty")
        vocab = w.loaded.config.vocab_size
        bad = next((t for t in request.prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prompt_token_ids: token id {bad} outside the vocabulary "
                                f"[0, {vocab})")
        sp = request.sampling
        if sp.max_tokens <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"sampling.max_tokens: {sp.max_tokens}, must be > 0")
        total = len(request.prompt_token_ids) + sp.max_tokens
        if total > w.loaded.max_context:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prompt + max_tokens = {total}, context limit {w.loaded.max_context}")
        params = sampling_from_proto(sp)
        try:
            res = w.reserve(request.request_id, list(request.prompt_token_ids), params,
                            asyncio.get_running_loop())
        except OutOfPages as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"KV pages: {e}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        w._notify_change()
        return res

    async def Stream(self, request, context):
        outbox = self.worker.outbox(request.request_id)
        if outbox is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"request_id: {request.request_id!r} has no reservation here")
        finished = False
        try:
            while True:
                item = await outbox.queue.get()
                if item[0] == "error":
                    finished = True
                    await context.abort(item[1], item[2])
                _, token, reason, logprob = item
                if token >= 0:
                    yield decode_pb2.TokenChunk(token_ids=[token], finish_reason=reason or "",
                                                logprobs=[] if logprob is None else [logprob])
                elif reason:
                    yield decode_pb2.TokenChunk(finish_reason=reason)
                if reason:
                    finished = True
                    return
        finally:
            if not finished:  # the caller went away: free everything the request holds
                self.worker.release(request.request_id)

    async def Release(self, request, context):
        return decode_pb2.ReleaseResponse(found=self.worker.release(request.request_id))


def _build(settings: DecodeSettings) -> tuple[LoadedModel, DecodeWorker]:
    loaded = load_for(settings)
    return loaded, DecodeWorker(loaded, settings.num_pages, settings.max_batch, settings.lease_s,
                                settings.device, agent_name=settings.worker_id or "decode",
                                quarantine_s=settings.quarantine_s,
                                turns=CpuTurns(settings.cpu_turns_path))


async def run(settings: DecodeSettings) -> None:
    security.configure(settings)  # before any server or channel exists
    loaded, worker = in_passing_thread(lambda: _build(settings))
    changed = asyncio.Event()
    loop = asyncio.get_running_loop()
    worker.on_change = lambda: loop.call_soon_threadsafe(changed.set)
    prom = CollectorRegistry()
    worker.export_metrics(WorkerMetrics(prom, "decode"))
    worker.start()
    servicer = DecodeServicer(worker)
    server, port, health = await create_server(
        [lambda s: decode_pb2_grpc.add_DecodeServicer_to_server(servicer, s)],
        [decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name],
        settings.host, settings.port,
    )
    await health.set("", SERVING)
    await health.set("pdserve.v1.Decode", SERVING)
    info = worker_info("decode", settings, loaded, advertised_address(settings, port),
                       worker.epoch, worker.pool.num_pages)
    stop = asyncio.Event()
    joiner = asyncio.create_task(join_gateway(settings.gateway, info, worker.load, stop, changed))
    metrics_port = serve_metrics(prom, settings.host, settings.metrics_port)
    write_ready_file(settings.ready_file, port, worker_id=info.worker_id,
                     metrics_port=metrics_port)
    log.info("decode serving", extra={"port": port, "worker_id": info.worker_id})

    async def drain() -> None:
        # Leave rotation first (the next report says so), then let accepted requests finish.
        worker.draining = True
        changed.set()
        deadline = loop.time() + settings.drain_timeout_s
        await asyncio.sleep(0.3)  # let the report reach the gateway
        while worker.busy and loop.time() < deadline:
            await asyncio.sleep(0.1)

    async def cleanup() -> None:
        stop.set()
        joiner.cancel()
        worker.stop()

    await serve_until_signal(server, health, cleanup, drain=drain)
