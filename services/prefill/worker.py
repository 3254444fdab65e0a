"""The prefill worker: one request's way through it (the package docstring numbers the steps),
composed of the engine thread that computes (compute.py), the cached blocks' fetch
(blocks.py, layer_fetch.py), the pipeline's head and stage (head.py, stage.py), the NIXL
endpoint that WRITEs to decode, and the load it reports (load.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from pdserve.cache.block_hash import BlockHash, block_hashes, cacheable_blocks, hash_namespace
from pdserve.engine.engine import LLMEngine
from pdserve.engine.hooks import EngineHooks
from pdserve.engine.kv_pool import KVPool, PageId
from pdserve.engine.loader import LoadedModel
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler import PREFILL_SLACK, Deferral
from pdserve.engine.sequence import Sequence as EngineSequence
from pdserve.engine.sequence import TokenEvent
from pdserve.metrics import PrefillMetrics
from pdserve.scheduler.balancers import attention_work, prefill_work
from pdserve.services.cpu_turns import CpuTurns
from pdserve.services.engine_thread import EngineThread, GatherPolicy, group_steps_of
from pdserve.services.kvstore_client import KVStoreClient
from pdserve.services.outbox import Outbox, Outboxes
from pdserve.services.prefill import layer_fetch
from pdserve.services.prefill.blocks import BlockIO
from pdserve.services.prefill.compute import Compute, PrefillHooks
from pdserve.services.prefill.guard import PageGuard
from pdserve.services.prefill.head import PipelineHead
from pdserve.services.prefill.layer_fetch import LayerLoad
from pdserve.services.prefill.lease import Lease, decode_peers
from pdserve.services.prefill.load import PrefillLoad
from pdserve.services.prefill.pipeline import Peers, head_share
from pdserve.services.prefill.stage import PipelineStage
from pdserve.services.transfer import NixlEndpoint, combine_digests, page_digests
from pdserve.services.worker import new_epoch, sampling_from_proto
from pdserve.startup import phase
from pdserve.v1 import common_pb2, kvstore_pb2, prefill_pb2

log = logging.getLogger(__name__)

# The engine's batch size does not bound a prefill worker: its prompts leave the engine with
# their first token, and the step's token budget bounds a step.
PREFILL_MAX_BATCH = 1 << 16
# How long a request waits for this worker's own writes of its prompt's blocks (tens of
# milliseconds as a rule) before computing them instead.
WRITTEN_WAIT_S = 2.0


class WriteAhead:
    """The pages of a prompt's fetched prefix WRITTEN into the decode reservation's first
    pages while the rest of the prompt computes (no notice: the last WRITE's covers them),
    so only the computed pages are left to send after the first token. Their digests are
    the verified blocks' checksums."""

    def __init__(self, endpoint: NixlEndpoint, res: common_pb2.Reservation, lease: Lease,
                 timeout_s: float) -> None:
        self.endpoint = endpoint
        self.res = res
        self.lease = lease
        self.timeout_s = timeout_s
        self.task: asyncio.Task[int] | None = None
        self.digests: list[int] = []

    def start(self, pages: Sequence[PageId], digests: list[int]) -> None:
        """Starts the WRITE of these fetched pages (none: nothing to send ahead; a lease
        already over: the final WRITE reports it)."""
        if not pages or self.task is not None or self.lease.over():
            return
        self.digests = digests
        self.task = asyncio.create_task(self.endpoint.write(pages, self.res, None,
                                                            self.timeout_s))
        # A request that failed before `done` never looks at it: its error is not news.
        self.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def done(self) -> tuple[int, list[int]]:
        """Bytes written ahead and those pages' digests (0 and none if nothing was)."""
        if self.task is None:
            return 0, []
        return await self.task, self.digests


@dataclass
class _Held:
    """What a request holds while it is here: its pages once taken, and the WRITE of its
    fetched pages sent ahead, if any (freed and awaited at the end)."""

    pages: list[PageId] = field(default_factory=list)
    ahead: WriteAhead | None = None


class PrefillWorker:
    def __init__(self, loaded: LoadedModel, num_pages: int, kvstore: KVStoreClient,
                 chunk_tokens: int = 2048, transfer_timeout_s: float = 30.0,
                 device: str = "cpu", agent_name: str = "prefill",
                 batch_wait_s: float = 0.0, fetch_layer_groups: int = 1,
                 fetch_nixl: bool = False, read_lanes: int = 2,
                 turns: CpuTurns | None = None,
                 wrap_hooks: Callable[[EngineHooks], EngineHooks] | None = None,
                 prefill_slack: float = PREFILL_SLACK,
                 deferral: Deferral = Deferral()) -> None:
        self.loaded = loaded
        self.layout = loaded.layout
        self.fingerprint = loaded.layout.fingerprint()
        self.namespace = hash_namespace(loaded.model_id, self.fingerprint)
        self.epoch = new_epoch()
        self.pool = KVPool(loaded.layout, num_pages, device)
        phase("KV pool allocation")
        self.hooks = PrefillHooks(turns or CpuTurns(None))
        hooks = wrap_hooks(self.hooks) if wrap_hooks is not None else self.hooks
        self.engine = LLMEngine(ModelRunner(loaded.model, self.pool, chunk_tokens),
                                max_batch=PREFILL_MAX_BATCH, max_prefill_tokens=chunk_tokens,
                                hooks=hooks, prefill_slack=prefill_slack, deferral=deferral)
        self.thread = EngineThread(self.engine, Outboxes(), name="prefill-engine",
                                   gather=GatherPolicy(batch_wait_s, chunk_tokens),
                                   group_steps=group_steps_of(hooks))
        self.guard = PageGuard(self.pool)
        self.compute = Compute(self.thread, self.hooks, self.guard)
        self.blocks = BlockIO(self.pool, self.fingerprint, kvstore, self.guard)
        # Parts per fetched block (layer groups); 1 = whole blocks, loaded before compute.
        self.fetch_layer_groups = fetch_layer_groups
        self.fetch_nixl = fetch_nixl  # READ blocks from the stores' staging buffers over NIXL
        self.endpoint = NixlEndpoint(f"{agent_name}-{self.epoch}", self.pool,
                                     read_lanes if fetch_nixl else 0)
        phase("NIXL registration")
        self.transfer_timeout_s = transfer_timeout_s
        self.load = PrefillLoad()
        peers = Peers()
        self.head = PipelineHead(self.pool, (loaded.config.hidden_size, loaded.dtype),
                                 self.compute, self.endpoint, peers, chunk_tokens,
                                 transfer_timeout_s)
        self.stage = PipelineStage(loaded, self.pool, self.namespace, self.compute, self.blocks,
                                   self.endpoint, peers, self.load, transfer_timeout_s)
        self.decode_peers = decode_peers()  # whose reservations' leases it renews
        self.num_prefills = 0
        self.draining = False
        self.metrics: PrefillMetrics | None = None

    @property
    def kvstore(self) -> KVStoreClient:
        return self.blocks.kvstore

    @kvstore.setter
    def kvstore(self, client: KVStoreClient) -> None:
        self.blocks.kvstore = client

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    def export_metrics(self, m: PrefillMetrics) -> None:
        self.metrics = self.head.metrics = self.stage.metrics = m
        m.watch_pool(self.pool)
        self.guard.on_wait = m.page_waits.inc
        m.queue.set_function(lambda: len(self.engine.scheduler))
        m.queued_tokens.set_function(lambda: self.load.queued_tokens)
        m.parked.set_function(
            lambda: sum(1 for s in list(self.engine.scheduler.waiting) if s.parked))

    def report(self) -> common_pb2.LoadReport:
        ld, sched = self.load, self.engine.scheduler
        return common_pb2.LoadReport(
            free_pages=self.pool.num_free, total_pages=self.pool.num_pages,
            running=len(sched), queued_tokens=ld.queued_tokens,
            queued_attention=ld.queued_attention, num_finished=self.num_prefills,
            draining=self.draining, due_s=sched.due(),
            prefill_rate=sched.rate.per_second, prefill_slack=sched.prefill_slack,
            defer_wait_s=sched.deferral.max_wait_s if sched.deferral.share > 0 else 0.0)

    def start(self) -> None:
        self.thread.start()

    async def stop(self) -> None:
        await self.blocks.drain()
        self.thread.stop()

    async def connect_stores(self, within_s: float = 60.0) -> int:
        """Connects this worker's NIXL agent (and its read lanes) to every kvstore shard's
        staging agent ahead of the first fetch (a `Stage` of no blocks answers the agent's
        metadata): the first READ from a store otherwise sets up the connection on a
        request's time. Shards not up yet are asked again until `within_s`; returns how many
        were connected."""
        if not self.fetch_nixl or not self.kvstore.enabled:
            return 0
        todo = set(range(len(self.kvstore.shards)))
        connected = 0
        deadline = time.monotonic() + within_s
        while todo and time.monotonic() < deadline:
            for shard in sorted(todo):
                try:  # quietly: a store still starting is asked again
                    resp = await self.kvstore.shards[shard].stub.Stage(
                        kvstore_pb2.StageRequest(), timeout=self.kvstore.timeout_s)
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # no staging buffer
                        todo.discard(shard)
                    continue
                try:
                    name = self.endpoint.remote(resp.agent_name, resp.agent_metadata)
                    self.endpoint.agent.make_connection(name)
                    for lane in self.endpoint.lanes:
                        await lane.connect(resp.agent_name, resp.agent_metadata)
                    connected += 1
                except Exception as e:  # noqa: BLE001 - the first READ connects instead
                    log.info("kvstore NIXL agent not connected ahead",
                             extra={"shard": shard, "error": str(e)})
                todo.discard(shard)
            if todo:
                await asyncio.sleep(0.5)
        return connected

    # -- one request -------------------------------------------------------------------------
    async def prefill(self, req: prefill_pb2.PrefillRequest) -> prefill_pb2.PrefillResponse:
        arrival = time.monotonic()  # its deadline here counts from now (engine/scheduler.py)
        prompt = list(req.prompt_token_ids)
        bt = self.layout.block_tokens
        keys = block_hashes(self.namespace, req.cache_salt, prompt, bt)
        full = cacheable_blocks(len(prompt), bt)
        want = min(max(req.cached_blocks_hint, 0), full)
        if (want < full and not req.pipeline and self.kvstore.enabled
                and await self.blocks.written(keys[want:full], WRITTEN_WAIT_S)):
            # This worker was still writing some of these blocks when the gateway looked
            # (a prompt's blocks go to the store after its answer): they are there now.
            found = await self.kvstore.lookup(keys[:full])
            want = max(want, found or 0)
        # Queue accounting assumes the hint holds; a pipeline's head does its share of layers.
        share = head_share(self.layout.num_layers, len(req.pipeline))
        c, n_new = want * bt, len(prompt) - want * bt
        # While the pool is short, in the engine's order: due as it will be there.
        due = arrival + self.engine.scheduler.allowance(prefill_work(c, n_new) * share)
        with self.load.charge(int(n_new * share), attention_work(c, n_new) * share):
            return await self._run(req, prompt, keys, want, arrival, due)

    async def _run(self, req: prefill_pb2.PrefillRequest, prompt: list[int],
                   keys: list[BlockHash], want: int, arrival: float, due: float
                   ) -> prefill_pb2.PrefillResponse:
        # Decode may reuse the reserved pages after its lease: never start a WRITE after it;
        # renewed there while the prompt is here, waiting for pages included (lease.py).
        lease = Lease(req.reservation,
                      self.decode_peers.get(req.decode_address) if req.decode_address else None)
        keeper = asyncio.create_task(lease.keep())
        try:
            work = asyncio.ensure_future(self._take_pages_and_prefill(
                req, prompt, keys, want, lease, arrival, due))
            try:
                await asyncio.wait({work, keeper}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                work.cancel()
                raise
            if not work.done() and lease.over() and not lease.writing:
                # The reservation is gone (the decode worker restarted or let it expire): no
                # WRITE may start, so stop now rather than compute the prompt for nothing.
                work.cancel()
                lease.check()
            return await work
        finally:
            keeper.cancel()
            if (m := self.metrics) is not None:
                m.lease_renewals.inc(lease.renewals)

    async def _take_pages_and_prefill(self, req: prefill_pb2.PrefillRequest, prompt: list[int],
                                      keys: list[BlockHash], want: int, lease: Lease,
                                      arrival: float, due: float) -> prefill_pb2.PrefillResponse:
        """Takes the prompt's pages, fetches its cached blocks into them, computes the rest,
        and sends the pages' KV to decode (the pages are freed at the end)."""
        held = _Held()
        try:
            if req.pipeline:  # the stages load the same cached blocks: whole, first
                held.pages = await self.guard.reserve(self.layout.pages_for(len(prompt)), due)
                t0 = time.perf_counter()
                n_cached = await self.blocks.load(keys[:want], held.pages)
                t1 = time.perf_counter()
                fetch_s = t1 - t0
                first = await self.head.prefill(req, prompt, held.pages, n_cached,
                                                sampling_from_proto(req.sampling),
                                                arrival=arrival)
            else:
                first, n_cached, fetch_s, t1 = await self._compute_parked(
                    req, prompt, keys[:want], lease, arrival, due, held)
            return await self._send(req, prompt, keys, lease, held, first, n_cached, fetch_s,
                                    t1)
        finally:
            if held.ahead is not None and held.ahead.task is not None:
                held.ahead.task.cancel()  # the pages stay held until its WRITE is over
                self.guard.hold(held.pages, held.ahead.task)
            if held.pages:
                self.guard.free(held.pages)

    async def _compute_parked(self, req: prefill_pb2.PrefillRequest, prompt: list[int],
                              keys: Sequence[BlockHash], lease: Lease, arrival: float,
                              due: float, held: _Held) -> tuple[TokenEvent, int, float, float]:
        """A whole prompt: it takes its place in the engine's order at once and its pages only
        when the engine calls it, about a step before its turn (engine/scheduler.py); then its
        cached blocks are fetched into them (by layer group while it computes, or whole before)
        and it runs. Returns the first token, the blocks used from the store, the fetch's
        duration and when computing began."""
        bt = self.layout.block_tokens
        seq = EngineSequence(req.request_id, prompt, sampling_from_proto(req.sampling), [],
                             num_computed=len(keys) * bt, stop_after_prefill=True,
                             arrival=arrival)
        async with self.compute.park(seq) as (box, called):
            await called
            seq.pages = held.pages = await self.guard.reserve(
                self.layout.pages_for(len(prompt)), due)
            t0 = time.perf_counter()
            if keys and (self.fetch_layer_groups > 1 or self.fetch_nixl) and self.kvstore.enabled:
                held.ahead = WriteAhead(self.endpoint, req.reservation, lease,
                                        self.transfer_timeout_s)
                first, n_cached, fetch_s = await self._compute_fetching(seq, box, keys,
                                                                        held.ahead)
                return first, n_cached, fetch_s, t0  # computing began at once
            n_cached = await self.blocks.load(keys, held.pages)
            t1 = time.perf_counter()
            self.compute.unpark(seq, n_cached * bt)
            return await self.compute.token(box), n_cached, t1 - t0, t1

    async def _send(self, req: prefill_pb2.PrefillRequest, prompt: list[int],
                    keys: list[BlockHash], lease: Lease, held: _Held, first: TokenEvent,
                    n_cached: int, fetch_s: float, t1: float) -> prefill_pb2.PrefillResponse:
        """WRITEs the prompt's KV to the decode reservation with its notice, then queues its
        new blocks for the store."""
        bt, pages = self.layout.block_tokens, held.pages
        # Pages written ahead (fetched ones, while the rest computed) are verified store
        # blocks: their digests are their headers' checksums; the rest are hashed here.
        early, known = (await held.ahead.done()) if held.ahead is not None else (0, [])
        rest = await self.guard.run(page_digests, self.pool, pages[len(known):], pages=pages)
        t2 = time.perf_counter()
        await lease.begin_write()
        notice = common_pb2.TransferNotice(
            request_id=req.request_id, epoch=req.reservation.epoch, first_token=first.token,
            num_prompt_tokens=len(prompt), kv_checksum=combine_digests(known + rest))
        nbytes = early + await self.endpoint.write(
            pages[len(known):], req.reservation, notice, self.transfer_timeout_s,
            first=len(known))
        t3 = time.perf_counter()
        # The new blocks, with the checksums the transfer took: one copy of each page.
        new_blocks = await self.blocks.encode(keys, pages, n_cached, known + rest)
        self.blocks.put_later(new_blocks)  # before the answer: a next request finds them
        self.num_prefills += 1
        if (m := self.metrics) is not None:
            m.computed_tokens.inc(len(prompt) - n_cached * bt)
            m.fetched_tokens.inc(n_cached * bt)
            m.fetch_seconds.observe(fetch_s)
            m.transfer_bytes.inc(nbytes)
            m.transfer_seconds.observe(t3 - t2)
        return prefill_pb2.PrefillResponse(
            first_token=first.token, cached_tokens=n_cached * bt,
            computed_tokens=len(prompt) - n_cached * bt, bytes_transferred=nbytes,
            fetch_s=fetch_s, compute_s=t2 - t1, transfer_s=t3 - t2,
            first_logprob=first.logprob or 0.0)

    async def _compute_fetching(self, seq: EngineSequence, box: Outbox,
                                keys: Sequence[BlockHash], ahead: WriteAhead | None
                                ) -> tuple[TokenEvent, int, float]:
        """A called prompt (Compute.park) computes its uncached part while its cached blocks
        stream into seq.pages by layer group (layer_fetch.py); returns the first token, the
        blocks used from the store and the fetch's duration. With `ahead`, the fetched pages
        are WRITTEN to decode as soon as they are all in and verified, while the rest
        computes."""
        pages = seq.pages
        load = LayerLoad(self.pool, self.fingerprint, keys, pages, self.fetch_layer_groups)

        async def fetch() -> None:
            try:
                await layer_fetch.fetch(load, self.kvstore,
                                        self.endpoint if self.fetch_nixl else None,
                                        self.kvstore.timeout_s)
            finally:
                load.finish()  # whatever happened: releases a forward waiting for it
            if ahead is not None:
                ahead.start(pages[:load.good or 0], load.digests())

        task = asyncio.create_task(fetch())
        try:
            self.compute.unpark(seq, len(keys) * self.layout.block_tokens, load)
            first = await self.compute.token(box)
        finally:
            task.cancel()  # no more writes into the pages once this returns
        end = load.settled_at or time.perf_counter()
        return first, load.good or 0, end - load.started

    async def compute_prompt(self, request_id: str, prompt: list[int], pages: list[PageId],
                             start: int = 0, params: SamplingParams | None = None
                             ) -> TokenEvent:
        """Computes the prompt into its pages from token `start` (KV before it in place) and
        returns its first token."""
        seq = EngineSequence(request_id, prompt, params or SamplingParams(), list(pages),
                             num_computed=start, stop_after_prefill=True)
        return await self.compute.first_token(seq)

    async def compute_while_fetching(self, request_id: str, prompt: list[int],
                                     pages: list[PageId], keys: Sequence[BlockHash],
                                     params: SamplingParams | None = None
                                     ) -> tuple[TokenEvent, int, float]:
        """The worker's own path for a prompt with cached blocks (`_compute_fetching`) into
        pages already taken: it waits for its turn, then computes while they stream in."""
        seq = EngineSequence(request_id, prompt, params or SamplingParams(), [],
                             num_computed=len(keys) * self.layout.block_tokens,
                             stop_after_prefill=True)
        async with self.compute.park(seq) as (box, called):
            await called
            seq.pages = list(pages)
            return await self._compute_fetching(seq, box, keys, None)
