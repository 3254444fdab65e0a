"""The prefill service: computes a prompt's KV (reusing cached blocks) and pushes it to decode.

Lifecycle of one request:
1. The gateway calls `Prefill` with the prompt, its cache salt, how many leading blocks the
   kvstore holds (a hint), the sampling parameters and a decode worker's `Reservation`.
2. Pages for the prompt are taken from this worker's pool; the cached leading blocks are fetched
   from the kvstore, verified (checksum, key and layout) and copied into them. Whatever could not
   be fetched is computed: a store that is down or slow only costs recompute.
3. The rest of the prompt joins the compute loop, which runs prompt chunks of several requests
   per step within a token budget (chunked prefill); when its last chunk is done the first
   token is sampled. By default 2 and 3 overlap: the blocks arrive in layer groups
   (`--kv-fetch-layer-groups`) while the rest of the prompt computes, each layer waiting only
   for its own group (services/layer_fetch.py); a block that fails verification is recomputed.
   A prompt the gateway pipelined (`PrefillRequest.pipeline`) is computed with the workers
   listed there running the first layers, chunk by chunk; this worker runs the last ones and
   READs theirs (services/pipeline.py).
4. The prompt's pages are WRITten into the reserved decode pages over NIXL with a notice
   carrying the first token and a checksum; the call returns once the WRITE completed.
5. New full blocks go to the kvstore in the background (best effort); the pages are freed.

Startup: load model, allocate and register the pool, serve, join the gateway.
Shutdown: NOT_SERVING, finish in-flight prefills, wait for pending block writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from pdserve.cache.block_hash import block_hashes, cacheable_blocks, hash_namespace
from pdserve.cache.codec import encode_block, verify_block
from pdserve.cache.errors import CorruptBlock
from pdserve.cache.memory import keep_large_buffers_on_heap
from pdserve.engine.engine import schedule_chunks
from pdserve.engine.errors import OutOfPages
from pdserve.engine.kv_pool import KVPool, PageId
from pdserve.engine.loader import LoadedModel
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams, logprob_of, sample
from pdserve.scheduler.balancers import attention_work
from pdserve.services import layer_fetch, security
from pdserve.services.cpu_turns import CpuTurns
from pdserve.services.kvstore_client import KVStoreClient
from pdserve.services.layer_fetch import LayerLoad
from pdserve.services.pipeline import MAX_STAGES, Pipeline, StageRefused, layer_split
from pdserve.services.registration import join_gateway
from pdserve.services.server import SERVING, create_server, serve_until_signal, write_ready_file
from pdserve.services.transfer import NixlEndpoint, TransferError, pages_checksum
from pdserve.services.worker import (
    advertised_address,
    in_passing_thread,
    load_for,
    new_epoch,
    sampling_from_proto,
    worker_info,
)
from pdserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from prometheus_client import CollectorRegistry

from pdserve.config import PrefillSettings
from pdserve.metrics import WorkerMetrics, serve_metrics

log = logging.getLogger(__name__)


@dataclass
class PrefillJob:
    """A prompt being prefilled: its pages, how far its KV is done, and who waits for it."""

    prompt: list[int]
    pages: list[PageId]
    num_computed: int
    params: SamplingParams | None = None  # for the first token, sampled on the engine thread
    load: LayerLoad | None = None  # cached blocks still arriving, layer group by layer group
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def _first_token(logits, params) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    first = sample(logits, params, 0)
    return first, logprob_of(logits, first) if params.logprobs else 0.0


class PrefillWorker(Pipeline):
    def __init__(self, loaded: LoadedModel, num_pages: int, kvstore: KVStoreClient,
                 chunk_tokens: int = 2048, transfer_timeout_s: float = 30.0,
                 device: str = "cpu", agent_name: str = "prefill",
                 batch_wait_s: float = 0.0, fetch_layer_groups: int = 1,
                 fetch_nixl: bool = False, turns: CpuTurns | None = None) -> None:
        self.turns = turns or CpuTurns(None)  # co-located workers take turns on the cores
        self.loaded = loaded
        self.layout = loaded.layout
        self.fingerprint = loaded.layout.fingerprint()
        self.namespace = hash_namespace(loaded.model_id, self.fingerprint)
        self.epoch = new_epoch()
        self.pool = KVPool(loaded.layout, num_pages, device)
        self.runner = ModelRunner(loaded.model, self.pool, chunk_tokens)
        self.step_tokens = chunk_tokens  # token budget of one prefill step, over all requests
        self.batch_wait_s = batch_wait_s
        # Parts per fetched block (layer groups); 1 = whole blocks, loaded before compute.
        self.fetch_layer_groups = fetch_layer_groups
        self.fetch_nixl = fetch_nixl  # READ blocks from the stores' staging buffers over NIXL
        self.endpoint = NixlEndpoint(f"{agent_name}-{self.epoch}", self.pool)
        self.kvstore = kvstore
        self.transfer_timeout_s = transfer_timeout_s
        self._queue: list[PrefillJob] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._puts: set[asyncio.Task] = set()
        self.num_prefills = 0
        self.num_steps = 0
        self.num_pipelined = 0  # prefills this worker headed as a pipeline (services/pipeline.py)
        self.num_pipeline_fallbacks = 0  # ... whose pipeline failed: computed here alone
        self.num_stages_served = 0  # pipeline stages run for other workers' prefills
        self.peer_stubs: dict[str, prefill_pb2_grpc.PrefillStub] = {}  # pipeline peers
        self.queued_tokens = 0
        self.queued_attention = 0.0
        self.in_flight = 0
        self.draining = False
        self.metrics: WorkerMetrics | None = None
        self._engine = ThreadPoolExecutor(1, thread_name_prefix="prefill-engine")
        self._busy: Counter[PageId] = Counter()  # pages a worker thread is using right now
        self._deferred: list[list[PageId]] = []  # freed while busy: released when not

    async def _in_thread(self, fn, *args, touches: Sequence[PageId], engine: bool = False):  # type: ignore[no-untyped-def]
        """Runs fn in a thread: the engine thread for model work (one thread, so one OpenMP
        team: see worker.in_passing_thread), a helper thread otherwise. A cancelled caller stops
        waiting, but the thread runs on: the pages it touches cannot be freed (and reused)
        until it is done (_free)."""
        touched = list(touches)
        self._busy.update(touched)
        fut = asyncio.get_running_loop().run_in_executor(self._engine if engine else None, fn,
                                                         *args)
        fut.add_done_callback(lambda _: self._thread_done(touched))
        return await asyncio.shield(fut)

    def _thread_done(self, touched: list[PageId]) -> None:
        self._busy.subtract(touched)
        self._busy += Counter()  # drop zero counts
        if self._deferred:
            ready = [p for p in self._deferred if not any(self._busy[x] for x in p)]
            for pages in ready:
                self._deferred.remove(pages)
                self.pool.release(pages)

    def _free(self, pages: list[PageId]) -> None:
        if any(self._busy[p] for p in pages):
            self._deferred.append(pages)
        else:
            self.pool.release(pages)

    def export_metrics(self, m: WorkerMetrics) -> None:
        self.metrics = m
        m.pages_total.set_function(lambda: self.pool.num_pages)
        m.pages_used.set_function(lambda: self.pool.num_pages - self.pool.num_free)
        m.pages_usage.set_function(lambda: 1 - self.pool.num_free / self.pool.num_pages)
        m.queue.set_function(lambda: len(self._queue))
        m.queued_tokens.set_function(lambda: self.queued_tokens)

    def load(self) -> common_pb2.LoadReport:
        return common_pb2.LoadReport(
            free_pages=self.pool.num_free, total_pages=self.pool.num_pages,
            running=len(self._queue), queued_tokens=self.queued_tokens,
            queued_attention=self.queued_attention, num_finished=self.num_prefills,
            draining=self.draining)

    # -- the compute loop: chunked prefill of several requests per step -----------------------
    async def _compute_loop(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                await self._gather()
                continue
            # A prompt whose cached blocks are still arriving computes while they arrive only
            # when nothing else is ready: a step waits for the slowest fetch in it (at most the
            # fetch's deadline), and a slow store must not hold up prompts that need nothing
            # from it.
            ready = [j for j in self._queue if j.load is None or j.load.settled]
            plan = schedule_chunks(ready or self._queue, self.step_tokens)
            chunks = [(j.prompt[j.num_computed:j.num_computed + n], j.num_computed, j.pages)
                      for j, n in plan]
            last = [i for i, (j, n) in enumerate(plan) if j.num_computed + n == len(j.prompt)]
            loads = [j.load for j, _ in plan if j.load is not None]

            def before_layer(layer: int, loads=loads) -> None:  # type: ignore[no-untyped-def]
                for load in loads:
                    load.wait(layer)

            def step(chunks=chunks, plan=plan, last=last, loads=loads):  # type: ignore[no-untyped-def]
                # The first token is sampled right after the forward, on the same thread.
                with self.turns.prefill():
                    logits = self.runner.forward_chunks(chunks, before_layer if loads else None)
                return {i: _first_token(logits[i], plan[i][0].params) for i in last}

            try:
                firsts = await self._in_thread(step, engine=True,
                                               touches=[p for j, _ in plan for p in j.pages])
            except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
                for j, _ in plan:
                    self._queue.remove(j)
                    if not j.done.done():
                        j.done.set_exception(e)
                continue
            self.num_steps += 1
            for i, (j, n) in enumerate(plan):
                if j not in self._queue:  # cancelled while its chunk ran
                    continue
                if j.load is not None:
                    # The forward waited through its last layer, so the fetch has settled.
                    good = j.load.good if j.load.good is not None else 0
                    recompute = good < j.load.n
                    j.load = None
                    if recompute:  # this step used unverified KV: redo from the last good block
                        j.num_computed = good * self.layout.block_tokens
                        continue
                j.num_computed += n
                if j.num_computed == len(j.prompt):
                    self._queue.remove(j)
                    if not j.done.done():
                        j.done.set_result(firsts[i])

    async def _gather(self) -> None:
        """Just woken from idle: waits up to batch_wait_s for more prompts to arrive, unless a
        whole step's worth of tokens is queued already."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        while (sum(len(j.prompt) - j.num_computed for j in self._queue) < self.step_tokens
               and (left := deadline - loop.time()) > 0):
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _compute(self, prompt: list[int], pages: list[PageId], start: int,
                       params: SamplingParams, load: LayerLoad | None = None) -> tuple[int, float]:
        """Prefills the prompt from token `start`; returns its first token and that token's
        log-probability (0.0 unless asked for). With `load`, KV before `start` is still
        arriving: the forward waits for it layer by layer, and if it does not all arrive
        verified the prompt is computed from the last good block instead."""
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._compute_loop())
        job = PrefillJob(prompt, pages, start, params, load)
        self._queue.append(job)
        self._wake.set()
        try:
            return await job.done
        finally:
            if job in self._queue:  # cancelled while queued
                self._queue.remove(job)

    # -- one request -------------------------------------------------------------------------
    async def prefill(self, req: prefill_pb2.PrefillRequest) -> prefill_pb2.PrefillResponse:
        prompt = list(req.prompt_token_ids)
        bt = self.layout.block_tokens
        keys = block_hashes(self.namespace, req.cache_salt, prompt, bt)
        want = min(max(req.cached_blocks_hint, 0), cacheable_blocks(len(prompt), bt))
        # Queue accounting assumes the hint holds.
        n_new, c = len(prompt) - want * bt, want * bt
        # Head of a pipeline: its share of the work is its share of the layers.
        num_layers = self.layout.num_layers
        stages = min(len(req.pipeline), num_layers - 1) + 1
        share = 1.0 if stages == 1 else (
            num_layers - layer_split(num_layers, stages)[-2]) / num_layers
        n_new, work = int(n_new * share), attention_work(c, len(prompt) - c) * share
        self.queued_tokens += n_new
        self.queued_attention += work
        self.in_flight += 1
        try:
            return await self._run(req, prompt, keys, want)
        finally:
            self.in_flight -= 1
            self.queued_tokens -= n_new
            self.queued_attention -= work

    async def _run(self, req, prompt: list[int], keys, want: int) -> prefill_pb2.PrefillResponse:
        bt = self.layout.block_tokens
        params = sampling_from_proto(req.sampling)
        # Decode may reuse the reserved pages after its lease: never start a WRITE after it.
        lease_end = time.monotonic() + req.reservation.lease_s if req.reservation.lease_s else None
        pages = self.pool.reserve(self.layout.pages_for(len(prompt)))
        try:
            t0 = time.perf_counter()
            if req.pipeline:  # the stages load the same cached blocks: whole, first
                n_cached = await self._load_cached(prompt, req.cache_salt, pages, want)
                t1 = time.perf_counter()
                fetch_s = t1 - t0
                first, first_logprob = await self._prefill_pipelined(req, prompt, pages,
                                                                     n_cached, params)
            elif want and (self.fetch_layer_groups > 1 or self.fetch_nixl) and self.kvstore.enabled:
                first, first_logprob, n_cached, fetch_s = await self._compute_while_fetching(
                    prompt, pages, keys[:want], params)
                t1 = t0  # computing started at once
            else:
                blocks = await self.kvstore.get(keys[:want]) if want else []
                n_cached = await self._in_thread(self._load_blocks, pages, keys, blocks,
                                                 touches=pages)
                t1 = time.perf_counter()
                fetch_s = t1 - t0
                first, first_logprob = await self._compute(prompt, pages, n_cached * bt, params)
            checksum = await self._in_thread(pages_checksum, self.pool, pages, touches=pages)
            t2 = time.perf_counter()
            if lease_end is not None and time.monotonic() > lease_end:
                raise TransferError(f"KV transfer not started: the decode reservation's "
                                    f"{req.reservation.lease_s:g} s lease ended first")
            notice = common_pb2.TransferNotice(
                request_id=req.request_id, epoch=req.reservation.epoch, first_token=first,
                num_prompt_tokens=len(prompt), kv_checksum=checksum)
            nbytes = await self.endpoint.write(pages, req.reservation, notice,
                                               self.transfer_timeout_s)
            t3 = time.perf_counter()
            start = max(n_cached, want) if n_cached == want else n_cached
            new_blocks = await self._in_thread(self._encode_blocks, pages, keys, start,
                                               touches=pages)
        finally:
            self._free(pages)
        self._put_later(new_blocks)
        self.num_prefills += 1
        if (m := self.metrics) is not None:
            m.computed_tokens.inc(len(prompt) - n_cached * bt)
            m.fetched_tokens.inc(n_cached * bt)
            m.fetch_seconds.observe(fetch_s)
            m.transfer_bytes.inc(nbytes)
            m.transfer_seconds.observe(t3 - t2)
        return prefill_pb2.PrefillResponse(
            first_token=first, cached_tokens=n_cached * bt,
            computed_tokens=len(prompt) - n_cached * bt, bytes_transferred=nbytes,
            fetch_s=fetch_s, compute_s=t2 - t1, transfer_s=t3 - t2,
            first_logprob=first_logprob)

    async def _compute_while_fetching(self, prompt: list[int], pages: list[PageId],
                                      keys: Sequence[bytes], params: SamplingParams
                                      ) -> tuple[int, float, int, float]:
        """Computes the prompt's uncached part while its cached blocks stream in by layer
        group (services/layer_fetch.py); returns the first token, its log-probability, the
        blocks used from the store and the fetch's duration."""
        load = LayerLoad(self.pool, self.fingerprint, keys, pages, self.fetch_layer_groups)

        async def fetch() -> None:
            try:
                await layer_fetch.fetch(load, self.kvstore, self.endpoint if self.fetch_nixl else None,
                                        self.kvstore.timeout_s)
            finally:
                load.finish()  # whatever happened: releases a forward waiting for it

        task = asyncio.create_task(fetch())
        try:
            first, logprob = await self._compute(prompt, pages, len(keys) * self.layout.block_tokens,
                                                 params, load)
        finally:
            task.cancel()  # no more writes into the pages once this returns
        end = load.settled_at or time.perf_counter()
        return first, logprob, load.good or 0, end - load.started

    def _load_blocks(self, pages: Sequence[PageId], keys, blocks: Sequence[bytes]) -> int:
        """Copies verified blocks into the leading pages; returns how many were usable."""
        for i, value in enumerate(blocks):
            try:
                payload = verify_block(keys[i], value, self.fingerprint)
            except CorruptBlock as e:
                log.warning("fetched block rejected", extra={"index": i, "why": str(e)})
                return i
            self.pool.write_page(pages[i], payload)
        return len(blocks)

    def _encode_blocks(self, pages: Sequence[PageId], keys, start: int) -> list[tuple[bytes, bytes, int]]:
        bt = self.layout.block_tokens
        return [(keys[i], encode_block(keys[i], self.fingerprint, bt,
                                       self.pool.page_bytes(pages[i]).cpu().numpy().tobytes()), i)
                for i in range(start, len(keys))]

    def _put_later(self, blocks: list[tuple[bytes, bytes, int]]) -> None:
        if not blocks or not self.kvstore.enabled:
            return
        task = asyncio.create_task(self.kvstore.put(blocks))
        self._puts.add(task)
        task.add_done_callback(self._puts.discard)

    async def drain(self) -> None:
        if self._puts:
            await asyncio.wait(list(self._puts), timeout=10)
        if self._loop_task is not None:
            self._loop_task.cancel()


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker) -> None:
        self.worker = worker

    def _invalid(self, req: prefill_pb2.PrefillRequest) -> str | None:
        w = self.worker
        n = len(req.prompt_token_ids)
        if not req.request_id:
            return "request_id: empty"
        if n == 0:
            return "prompt_token_ids: empty"
        if n > w.loaded.max_context:
            return f"prompt_token_ids: {n} tokens, context limit {w.loaded.max_context}"
        vocab = w.loaded.config.vocab_size
        bad = next((t for t in req.prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            return f"prompt_token_ids: token id {bad} outside the vocabulary [0, {vocab})"
        res = req.reservation
        if res.layout_fingerprint != w.fingerprint:
            return (f"reservation.layout_fingerprint: {res.layout_fingerprint!r}, "
                    f"this worker's is {w.fingerprint!r}")
        if len(res.pages) < w.layout.pages_for(n):
            return f"reservation.pages: {len(res.pages)}, the prompt needs {w.layout.pages_for(n)}"
        if len(req.pipeline) > MAX_STAGES:
            return f"pipeline: {len(req.pipeline)} stages before this one, at most {MAX_STAGES}"
        if any(not p.address for p in req.pipeline):
            return "pipeline: a stage without an address"
        return None

    async def Prefill(self, request, context):
        if (err := self._invalid(request)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)
        try:
            return await self.worker.prefill(request)
        except OutOfPages as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill KV pages: {e}")
        except TransferError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    async def PrefillStage(self, request_iterator, context):
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        try:
            async for out in self.worker.stage(first, requests):
                yield out
        except StageRefused as e:
            await context.abort(e.code, str(e))
        except OutOfPages as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill KV pages: {e}")


async def run(settings: PrefillSettings) -> None:
    keep_large_buffers_on_heap()  # KV blocks of megabytes: see cache/memory.py
    security.configure(settings)  # before any server or channel exists
    kvstore = KVStoreClient(settings.kvstore, settings.kvstore_timeout_s)

    def build() -> tuple[LoadedModel, PrefillWorker]:
        loaded = load_for(settings)
        return loaded, PrefillWorker(
            loaded, settings.num_pages, kvstore, settings.prefill_chunk_tokens,
            settings.transfer_timeout_s, settings.device,
            agent_name=settings.worker_id or "prefill",
            batch_wait_s=settings.prefill_batch_wait_ms / 1000,
            fetch_layer_groups=settings.kv_fetch_layer_groups,
            fetch_nixl=settings.kv_fetch == "nixl", turns=CpuTurns(settings.cpu_turns_path))

    # Model load and pool allocation in a thread that exits (worker.in_passing_thread says why).
    loaded, worker = in_passing_thread(build)
    prom = CollectorRegistry()
    worker.export_metrics(WorkerMetrics(prom, "prefill"))
    servicer = PrefillServicer(worker)
    server, port, health = await create_server(
        [lambda s: prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, s)],
        [prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name],
        settings.host, settings.port,
    )
    await health.set("", SERVING)
    await health.set("pdserve.v1.Prefill", SERVING)
    info = worker_info("prefill", settings, loaded, advertised_address(settings, port),
                       worker.epoch, worker.pool.num_pages)
    stop = asyncio.Event()
    joiner = asyncio.create_task(join_gateway(settings.gateway, info, worker.load, stop))
    metrics_port = serve_metrics(prom, settings.host, settings.metrics_port)
    write_ready_file(settings.ready_file, port, worker_id=info.worker_id,
                     metrics_port=metrics_port)
    log.info("prefill serving", extra={"port": port, "worker_id": info.worker_id})

    async def drain() -> None:
        worker.draining = True  # the next load report takes this worker out of rotation
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.drain_timeout_s
        await asyncio.sleep(0.3)
        while worker.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.1)

    async def cleanup() -> None:
        stop.set()
        joiner.cancel()
        await worker.drain()
        await kvstore.close()

    await serve_until_signal(server, health, cleanup, drain=drain)
