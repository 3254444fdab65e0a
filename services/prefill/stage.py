"""A stage of a pipelined prefill (pipeline.py says what the pipeline is): layers
[layer_begin, layer_end) of another worker's prompt.

Lifecycle of one stage:
1. Check the request (INVALID_ARGUMENT naming the field); reserve pages; load the cached
   blocks (FAILED_PRECONDITION when they cannot all be had: the head then computes alone).
2. The first stage cuts the prompt into `chunk_tokens` chunks itself; a later stage calls the
   stage before it (`PrefillStage`, with the stages before that) and takes its hidden chunks.
   Either way each chunk is one engine step over this stage's layers, and its hidden states
   go out as soon as they are computed.
3. After the last chunk: the KV messages of the stages before it, then its own (`StageKV`).
4. Hold the pages (and keep the NIXL agent progressing: the head READs them) until the caller
   closes its side, or `transfer_timeout_s`; then release the stage before it and free them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pdserve.cache.block_hash import block_hashes
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.loader import LoadedModel
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import FailedEvent, HiddenEvent, StageWork
from pdserve.engine.sequence import Sequence as EngineSequence
from pdserve.metrics import PrefillMetrics
from pdserve.scheduler.balancers import attention_work
from pdserve.services.errors import FailedPrecondition, Internal, Unavailable
from pdserve.services.outbox import Outbox, OutboxMessage
from pdserve.services.prefill.blocks import BlockIO
from pdserve.services.prefill.compute import Compute
from pdserve.services.prefill.load import PrefillLoad
from pdserve.services.prefill.pipeline import (
    Peers,
    PipelineError,
    check_stage,
    hidden_message,
    hidden_tensor,
    release,
    stage_kv,
)
from pdserve.services.transfer import NixlEndpoint
from pdserve.v1 import prefill_pb2

if TYPE_CHECKING:
    from pdserve.services.prefill.pipeline import StageCall

log = logging.getLogger(__name__)

PROGRESS_POLL_S = 0.0005


async def _drain(requests: AsyncIterator[prefill_pb2.PipelineStageRequest]) -> None:
    async for _ in requests:
        pass


class PipelineStage:
    def __init__(self, loaded: LoadedModel, pool: KVPool, namespace: str, compute: Compute,
                 blocks: BlockIO, endpoint: NixlEndpoint, peers: Peers, load: PrefillLoad,
                 transfer_timeout_s: float) -> None:
        self.loaded = loaded
        self.pool = pool
        self.layout = pool.layout
        self.namespace = namespace
        self.compute = compute
        self.blocks = blocks
        self.endpoint = endpoint
        self.peers = peers
        self.load = load
        self.timeout_s = transfer_timeout_s
        self.metrics: PrefillMetrics | None = None
        self.num_served = 0  # stages run for other workers' prefills

    async def run(self, req: prefill_pb2.PipelineStageRequest,
                  rest: AsyncIterator[prefill_pb2.PipelineStageRequest]
                  ) -> AsyncIterator[prefill_pb2.PipelineStageOutput]:
        """Runs layers [layer_begin, layer_end) over the prompt: hidden states out chunk by
        chunk, then the KV messages of the stages before it and its own; holds its pages until
        the caller closes its side (`rest` ends)."""
        layout = self.layout
        check_stage(req, layout.num_layers, layout.block_tokens, self.loaded.max_context,
                    self.loaded.config.vocab_size)
        prompt = list(req.prompt_token_ids)
        lo, hi = req.layer_begin, req.layer_end
        share = (hi - lo) / layout.num_layers
        c = req.cached_blocks * layout.block_tokens
        pages = self.pool.reserve(layout.pages_for(len(prompt)))
        up: StageCall | None = None
        poller: asyncio.Task[None] | None = None
        with self.load.charge(int((len(prompt) - c) * share),
                              attention_work(c, len(prompt) - c) * share):
            try:
                keys = block_hashes(self.namespace, req.cache_salt, prompt,
                                    layout.block_tokens)[:req.cached_blocks]
                if await self.blocks.load(keys, pages) < req.cached_blocks:
                    raise FailedPrecondition(f"cached_blocks: fewer than {req.cached_blocks} "
                                             f"blocks loadable from the kvstore")
                work = StageWork(lo, hi, req.chunk_tokens)
                seq = EngineSequence(req.request_id, prompt, SamplingParams(), list(pages),
                                     num_computed=c, stage=work)
                if req.upstream:
                    up = self.peers.stage_call(req.upstream[-1].address)
                    await up.write(self._upstream_request(req))
                async for out in self._compute(seq, work, up, req):
                    yield out
                yield prefill_pb2.PipelineStageOutput(kv=stage_kv(
                    self.pool, self.endpoint.name, self.endpoint.metadata, self.endpoint.mem_type,
                    pages[req.cached_blocks:], lo, hi))
                self.num_served += 1
                if self.metrics is not None:
                    self.metrics.pipeline_stages.inc()
                # Until the caller has READ the KV (it closes its side) or goes away. A READ's
                # target must progress its agent meanwhile (UCX: else REMOTE_DISCONNECT).
                poller = asyncio.create_task(self._progress())
                try:
                    await asyncio.wait_for(_drain(rest), self.timeout_s)
                except asyncio.TimeoutError:
                    log.warning("pipeline stage not released in time; freeing its pages",
                                extra={"request_id": req.request_id})
                    return
                if up is not None:  # the caller is done with every stage's KV
                    await release(up, self.timeout_s)
                    up = None
            finally:
                if poller is not None:
                    poller.cancel()
                if up is not None:
                    up.cancel()  # failed, or the caller went away
                self.compute.guard.free(pages)

    def _upstream_request(self, req: prefill_pb2.PipelineStageRequest
                          ) -> prefill_pb2.PipelineStageRequest:
        return prefill_pb2.PipelineStageRequest(
            request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
            cache_salt=req.cache_salt, cached_blocks=req.cached_blocks,
            layer_begin=req.upstream_layers[-2] if len(req.upstream) > 1 else 0,
            layer_end=req.upstream_layers[-1], chunk_tokens=req.chunk_tokens,
            upstream=req.upstream[:-1], upstream_layers=req.upstream_layers[:-1])

    async def _compute(self, seq: EngineSequence, work: StageWork, up: StageCall | None,
                       req: prefill_pb2.PipelineStageRequest
                       ) -> AsyncIterator[prefill_pb2.PipelineStageOutput]:
        """This stage's hidden chunks as the engine computes them, then the upstream stages' KV
        messages (a later stage's input comes from `up`, read meanwhile)."""
        async with self.compute.submit(seq) as box:
            reader = (asyncio.create_task(self._read_upstream(up, seq, work, req))
                      if up is not None else None)
            try:
                pos = seq.num_computed
                loop = asyncio.get_running_loop()
                sent = loop.time()
                while pos < len(seq.prompt):
                    # Nothing to send for a third of the timeout: tell the reader this stage
                    # waits (queued, deferred, or waiting for its own upstream), not gone.
                    msg = await self._next(box, reader, self.timeout_s / 3)
                    if msg is None:
                        yield prefill_pb2.PipelineStageOutput(waiting=prefill_pb2.StageWaiting(
                            waited_s=loop.time() - sent))
                        continue
                    sent = loop.time()
                    if isinstance(msg, FailedEvent):
                        raise Internal(f"pipeline stage step failed: {msg.error}")
                    assert isinstance(msg, HiddenEvent), msg
                    yield hidden_message(msg.begin, msg.hidden)
                    pos = msg.begin + msg.hidden.shape[0]
                kvs = await reader if reader is not None else []
            finally:
                if reader is not None:
                    reader.cancel()
        for kv in kvs:
            yield prefill_pb2.PipelineStageOutput(kv=kv)

    @staticmethod
    async def _next(box: Outbox, reader: asyncio.Task[list[prefill_pb2.StageKV]] | None,
                    wait_s: float) -> OutboxMessage | None:
        """The next engine event, or None after `wait_s` without one (it stays in the box);
        a failed upstream reader ends the stage first."""
        get = asyncio.ensure_future(box.get())
        try:
            waits: set[asyncio.Future[Any]] = {get}
            if reader is not None and not reader.done():
                waits.add(reader)
            await asyncio.wait(waits, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            if get.done():
                return get.result()
            if reader is not None and reader.done() and reader.exception() is not None:
                reader.result()  # raises the upstream's failure
            return None  # (or the reader has all it needs: the caller asks again)
        finally:
            get.cancel()

    async def _read_upstream(self, up: StageCall, seq: EngineSequence, work: StageWork,
                             req: prefill_pb2.PipelineStageRequest
                             ) -> list[prefill_pb2.StageKV]:
        """The previous stage's hidden chunks into this stage's inputs, in order; returns the
        KV messages of the stages before this one."""
        pos, n_prompt = seq.num_computed, len(seq.prompt)
        kvs: list[prefill_pb2.StageKV] = []
        while len(kvs) < len(req.upstream):
            msg = await asyncio.wait_for(up.read(), self.timeout_s)
            if not isinstance(msg, prefill_pb2.PipelineStageOutput):  # EOF
                raise Unavailable(f"upstream stage {req.upstream[-1].worker_id} ended early")
            if msg.WhichOneof("kind") == "kv":
                kvs.append(msg.kv)
                continue
            if msg.WhichOneof("kind") == "waiting":  # it is there, its chunk still to come
                continue
            try:
                h = hidden_tensor(msg.hidden, self.loaded.dtype,
                                  self.loaded.config.hidden_size, self.pool.kv.device)
            except PipelineError as e:
                raise Internal(str(e)) from None
            if msg.hidden.begin != pos or pos + h.shape[0] > n_prompt:
                raise Internal(f"hidden chunk at {msg.hidden.begin} of {h.shape[0]} tokens, "
                               f"expected one at {pos} inside the prompt's {n_prompt}")
            work.inputs.append((pos, h))
            self.compute.thread.wake()
            pos += h.shape[0]
        return kvs

    async def _progress(self) -> None:
        agent = self.endpoint.agent
        while True:
            agent.get_new_notifs()  # nothing is sent to a prefill agent; this progresses it
            await asyncio.sleep(PROGRESS_POLL_S)
