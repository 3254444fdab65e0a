"""The head of a pipelined prefill (pipeline.py says what the pipeline is): calls the last of the
stages, runs the last layers over the hidden states they stream back, READs their KV, and
falls back to computing the prompt alone when anything in the pipeline fails.

Lifecycle of one pipelined prompt at the head:
1. Open `PrefillStage` on the last upstream stage with the stage request (which carries the
   stages before it); it calls the one before it, and so on.
2. Each hidden chunk that arrives (in order, inside the prompt) joins the head's stage sequence
   in the engine: one engine step per chunk over layers [lo, L); the last one samples the first
   token.
3. Collect every stage's `StageKV`, check their layer ranges, READ each into the pages.
4. Close the stream: the stages free their pages.
On any failure (a stage gone, refusing, late, sending nonsense): the stage sequence leaves the
engine and the prompt is computed here from its cached prefix.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import torch

from pdserve.engine.kv_pool import KVPool, PageId
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import FailedEvent, StageWork, TokenEvent
from pdserve.engine.sequence import Sequence as EngineSequence
from pdserve.metrics import PrefillMetrics
from pdserve.scheduler.balancers import pipeline_chunk
from pdserve.services.prefill.compute import Compute
from pdserve.services.prefill.pipeline import (
    Peers,
    PipelineError,
    hidden_tensor,
    layer_split,
    release,
)
from pdserve.services.transfer import NixlEndpoint
from pdserve.v1 import prefill_pb2

if TYPE_CHECKING:
    from pdserve.services.prefill.pipeline import StageCall

log = logging.getLogger(__name__)


class PipelineHead:
    def __init__(self, pool: KVPool, hidden: tuple[int, torch.dtype], compute: Compute,
                 endpoint: NixlEndpoint, peers: Peers, chunk_tokens: int,
                 transfer_timeout_s: float) -> None:
        self.pool = pool
        self.layout = pool.layout
        self.hidden_size, self.hidden_dtype = hidden  # the model's (its KV pool's may differ)
        self.compute = compute
        self.endpoint = endpoint
        self.peers = peers
        self.chunk_tokens = chunk_tokens
        self.timeout_s = transfer_timeout_s
        self.metrics: PrefillMetrics | None = None
        self.num_pipelined = 0  # prefills headed as a pipeline
        self.num_fallbacks = 0  # ... whose pipeline failed: computed here alone

    async def prefill(self, req: prefill_pb2.PrefillRequest, prompt: list[int],
                      pages: list[PageId], n_cached: int, params: SamplingParams,
                      arrival: float | None = None) -> TokenEvent:
        """The first token of a prompt prefilled with the stages in req.pipeline running the
        first layers; computed here alone if the pipeline fails. Due in this worker's order as
        from `arrival` (None: now)."""
        try:
            out = await self._run(req, prompt, pages, n_cached, params, arrival)
        except (PipelineError, grpc.aio.AioRpcError, asyncio.TimeoutError) as e:
            why = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            log.warning("pipelined prefill failed; computing the prompt here",
                        extra={"request_id": req.request_id, "error": why or type(e).__name__})
            self.num_fallbacks += 1
            if self.metrics is not None:
                self.metrics.pipelined.labels("fallback").inc()
            seq = EngineSequence(req.request_id, prompt, params, list(pages),
                                 num_computed=n_cached * self.layout.block_tokens,
                                 stop_after_prefill=True, arrival=arrival)
            return await self.compute.first_token(seq)
        self.num_pipelined += 1
        if self.metrics is not None:
            self.metrics.pipelined.labels("ok").inc()
        return out

    def _stage_request(self, req: prefill_pb2.PrefillRequest, prompt: list[int], cached: int,
                       peers: Sequence[prefill_pb2.PipelinePeer], ends: Sequence[int]
                       ) -> prefill_pb2.PipelineStageRequest:
        """The request for the last of `peers`, which runs layers [ends[-3], ends[-2])."""
        new = len(prompt) - cached * self.layout.block_tokens
        return prefill_pb2.PipelineStageRequest(
            request_id=req.request_id, prompt_token_ids=prompt, cache_salt=req.cache_salt,
            cached_blocks=cached, layer_begin=ends[-3] if len(ends) > 2 else 0,
            layer_end=ends[-2], chunk_tokens=pipeline_chunk(new, len(ends), self.chunk_tokens),
            upstream=peers[:-1], upstream_layers=ends[:-2])

    async def _run(self, req: prefill_pb2.PrefillRequest, prompt: list[int],
                   pages: list[PageId], n_cached: int, params: SamplingParams,
                   arrival: float | None) -> TokenEvent:
        num_layers = self.layout.num_layers
        peers = list(req.pipeline)[-(num_layers - 1):]  # a stage has one layer at least
        ends = layer_split(num_layers, len(peers) + 1)
        start = n_cached * self.layout.block_tokens
        work = StageWork(ends[-2], num_layers, self.chunk_tokens)
        seq = EngineSequence(req.request_id, prompt, params, list(pages), num_computed=start,
                             stage=work, arrival=arrival)
        call = self.peers.stage_call(peers[-1].address)
        released = False
        try:
            await call.write(self._stage_request(req, prompt, n_cached, peers, ends))
            async with self.compute.submit(seq) as box:
                kvs = await self._feed(call, seq, work, peers[-1].worker_id, len(peers))
                msg = await box.get()  # the last chunk's step: the first token
            if isinstance(msg, FailedEvent):
                raise PipelineError(f"the head's layers failed: {msg.error}")
            assert isinstance(msg, TokenEvent), msg
            await self._read_stage_kv(kvs, pages[n_cached:], ends)
            await release(call, self.timeout_s)  # the stages free their pages
            released = True
            return msg
        finally:
            if not released:
                call.cancel()

    async def _feed(self, call: StageCall, seq: EngineSequence, work: StageWork, peer: str,
                    num_kvs: int) -> list[prefill_pb2.StageKV]:
        """Hands each hidden chunk the stages send to the head's stage sequence, in order;
        returns the stages' KV messages once all have come."""
        pos, n_prompt = seq.num_computed, len(seq.prompt)
        kvs: list[prefill_pb2.StageKV] = []
        while len(kvs) < num_kvs:
            msg = await asyncio.wait_for(call.read(), self.timeout_s)
            if not isinstance(msg, prefill_pb2.PipelineStageOutput):  # EOF
                raise PipelineError(f"stage {peer} ended its stream early")
            if msg.WhichOneof("kind") == "kv":
                kvs.append(msg.kv)
                continue
            if msg.WhichOneof("kind") == "waiting":  # it is there, its chunk still to come
                continue
            if pos >= n_prompt or msg.hidden.begin != pos:
                raise PipelineError(f"hidden chunk at {msg.hidden.begin}, expected {pos}")
            h = hidden_tensor(msg.hidden, self.hidden_dtype, self.hidden_size, self.pool.kv.device)
            if pos + h.shape[0] > n_prompt:
                raise PipelineError(f"hidden chunk past the prompt's {n_prompt} tokens")
            work.inputs.append((pos, h))
            self.compute.thread.wake()
            pos += h.shape[0]
        if pos != n_prompt:
            raise PipelineError(f"the stages delivered {pos} of {n_prompt} tokens")
        return kvs

    async def _read_stage_kv(self, kvs: Sequence[prefill_pb2.StageKV], pages: Sequence[PageId],
                             ends: Sequence[int]) -> None:
        """READs each stage's layers of the pages over NIXL, checking that the stages' layer
        ranges are the ones asked for and their ranges match these pages."""
        lb = self.pool.page_nbytes // self.layout.num_layers
        got = sorted((kv.layer_begin, kv.layer_end) for kv in kvs)
        want = list(zip([0, *ends[:-2]], ends[:-1]))
        if got != want:
            raise PipelineError(f"stages hold layers {got}, expected {want}")
        for kv in kvs:
            size = (kv.layer_end - kv.layer_begin) * lb
            if len(kv.ranges) != len(pages) or any(r.length != size for r in kv.ranges):
                raise PipelineError(f"stage KV of {len(kv.ranges)} ranges for {len(pages)} pages")
            try:
                remote = self.endpoint.remote(kv.agent_name, kv.agent_metadata)
            except Exception as e:
                raise PipelineError(f"stage agent {kv.agent_name!r}: {e}") from e
            local = [(self.pool.page_addr(p) + kv.layer_begin * lb, size) for p in pages]
            rem = [(r.addr, r.length, r.device_id) for r in kv.ranges]
            if not await self.endpoint.read(remote, (local, rem), kv.mem_type or "DRAM",
                                            self.timeout_s):
                raise PipelineError(f"NIXL READ of layers [{kv.layer_begin}, {kv.layer_end}) "
                                    f"from {kv.agent_name} failed")
