"""Pipelined prefill of a long prompt over several prefill workers (Mooncake's chunked pipeline
parallelism).

One prompt's prefill is too much for one worker when it alone would keep that worker busy far
longer than the others (a 190k-token prompt is most of a minute). The gateway's balancer
(scheduler/balancers.py, plan_prefill_index) then picks G workers; each runs 1/G of the layers
over the whole prompt, chunk by chunk, so each does 1/G of the work and the stages overlap:

    stage 0 (layers 0..a)   | chunk 0 | chunk 1 | chunk 2 |
    stage 1 (layers a..b)             | chunk 0 | chunk 1 | chunk 2 |
    head    (layers b..L)                       | chunk 0 | chunk 1 | chunk 2 | READ KV |

The head is the worker the gateway sent `Prefill` to, with the others in
`PrefillRequest.pipeline`. It calls the last of them with `PrefillStage`, which calls the one
before it, and so on; hidden states flow back down the chain as protobuf messages, one per
chunk. Each stage keeps the KV of its own layers in its own pages. After the last chunk every
stage sends a `StageKV` (its NIXL agent and, per page, the byte range of its layers: pages are
page-major, so a layer range of a page is one range), forwarded down the chain; the head READs
those ranges into its pages, so it ends with every layer of every page, as if it had computed
the prompt alone, and carries on as usual (checksum, WRITE to decode, blocks to the kvstore).
Closing its side of the stream releases the stages, which free their pages.

Cached blocks: the head loads them as usual and tells the stages how many; each stage loads the
same blocks (its layers are in them). A stage that cannot, or any other failure of the
pipeline, costs only time: the head computes the prompt alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
import torch
from pdserve.cache.block_hash import block_hashes, cacheable_blocks
from pdserve.engine.kv_pool import PageId
from pdserve.scheduler.balancers import attention_work, pipeline_chunk
from pdserve.services.server import channel
from pdserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)

MAX_CHUNK_TOKENS = 65_536
MAX_STAGES = 64  # PrefillRequest.pipeline entries at most


class PipelineError(Exception):
    """The pipeline did not deliver; the head computes the prompt alone."""


class StageRefused(Exception):
    """A stage request that cannot be served: a gRPC status and a message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def layer_split(num_layers: int, stages: int) -> list[int]:
    """layer_end of each of `stages` stages, as even as whole layers allow (the first stages
    take the extra layers: the head also samples, READs and sends)."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"{stages} pipeline stages for {num_layers} layers")
    base, extra = divmod(num_layers, stages)
    ends, end = [], 0
    for g in range(stages):
        end += base + (1 if g < extra else 0)
        ends.append(end)
    return ends


def hidden_message(begin: int, h: torch.Tensor) -> prefill_pb2.PipelineStageOutput:
    h = h.contiguous()
    return prefill_pb2.PipelineStageOutput(hidden=prefill_pb2.HiddenChunk(
        begin=begin, num_tokens=h.shape[0], dtype=str(h.dtype).removeprefix("torch."),
        data=h.view(torch.uint8).cpu().numpy().tobytes()))


def hidden_tensor(msg: prefill_pb2.HiddenChunk, dtype: torch.dtype, hidden_size: int,
                  device: torch.device) -> torch.Tensor:
    want = str(dtype).removeprefix("torch.")
    if msg.dtype != want:
        raise PipelineError(f"hidden states in {msg.dtype!r}, this worker computes in {want!r}")
    row = hidden_size * torch.finfo(dtype).bits // 8
    if msg.num_tokens <= 0 or len(msg.data) != msg.num_tokens * row:
        raise PipelineError(f"hidden chunk of {len(msg.data)} bytes for {msg.num_tokens} tokens "
                            f"of {row} bytes")
    h = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype)
    return h.view(msg.num_tokens, hidden_size).to(device)


async def _drain(requests: AsyncIterator) -> None:
    async for _ in requests:
        pass


async def release(call, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    """Closes our side of a stage's stream and waits for its end: the stage (and the stages
    before it) have freed their pages when this returns."""
    await call.done_writing()
    while await asyncio.wait_for(call.read(), timeout_s) is not grpc.aio.EOF:
        pass


class Pipeline:
    """PrefillWorker's part in pipelined prefills: the head (`_prefill_pipelined`) and a stage
    (`stage`). Mixed into PrefillWorker, whose pool, runner, endpoint and kvstore it uses."""

    num_stages_served: int
    num_pipelined: int
    num_pipeline_fallbacks: int
    peer_stubs: dict[str, prefill_pb2_grpc.PrefillStub]

    def _peer(self, address: str) -> prefill_pb2_grpc.PrefillStub:
        """A stub for another prefill worker, its channel kept for the next pipeline."""
        stub = self.peer_stubs.get(address)
        if stub is None:
            stub = self.peer_stubs[address] = prefill_pb2_grpc.PrefillStub(channel(address))
        return stub

    def _forward_stage(self, *args):  # type: ignore[no-untyped-def]
        with self.turns.prefill():  # type: ignore[attr-defined]
            return self.runner.forward_stage(*args)  # type: ignore[attr-defined]

    def _layer_bytes(self) -> int:
        return self.pool.page_nbytes // self.layout.num_layers  # type: ignore[attr-defined]

    def _stage_kv(self, pages: Sequence[PageId], lo: int, hi: int) -> prefill_pb2.StageKV:
        lb = self._layer_bytes()
        dev = max(self.pool.kv.get_device(), 0)  # type: ignore[attr-defined]
        return prefill_pb2.StageKV(
            agent_name=self.endpoint.name, agent_metadata=self.endpoint.metadata,  # type: ignore[attr-defined]
            layer_begin=lo, layer_end=hi, mem_type=self.endpoint.mem_type,  # type: ignore[attr-defined]
            ranges=[common_pb2.PageDescriptor(addr=self.pool.page_addr(p) + lo * lb,  # type: ignore[attr-defined]
                                              length=(hi - lo) * lb, device_id=dev)
                    for p in pages])

    async def _load_cached(self, prompt: list[int], salt: str, pages: Sequence[PageId],
                           n: int) -> int:
        """Loads the first n cached blocks into the pages; returns how many were usable."""
        if not n:
            return 0
        keys = block_hashes(self.namespace, salt, prompt, self.layout.block_tokens)[:n]  # type: ignore[attr-defined]
        blocks = await self.kvstore.get(keys)  # type: ignore[attr-defined]
        return await self._in_thread(self._load_blocks, pages, keys, blocks, touches=pages)  # type: ignore[attr-defined]

    def _stage_request(self, req_id: str, prompt: list[int], salt: str, cached: int,
                       peers: Sequence[prefill_pb2.PipelinePeer], ends: Sequence[int]
                       ) -> prefill_pb2.PipelineStageRequest:
        """The request for the last of `peers`, which runs layers [ends[-3], ends[-2])."""
        new = len(prompt) - cached * self.layout.block_tokens  # type: ignore[attr-defined]
        return prefill_pb2.PipelineStageRequest(
            request_id=req_id, prompt_token_ids=prompt, cache_salt=salt, cached_blocks=cached,
            layer_begin=ends[-3] if len(ends) > 2 else 0, layer_end=ends[-2],
            chunk_tokens=pipeline_chunk(new, len(ends), self.runner.chunk),  # type: ignore[attr-defined]
            upstream=peers[:-1], upstream_layers=ends[:-2])

    # -- the head ----------------------------------------------------------------------------
    async def _prefill_pipelined(self, req: prefill_pb2.PrefillRequest, prompt: list[int],
                                 pages: list[PageId], n_cached: int, params
                                 ) -> tuple[int, float]:  # type: ignore[no-untyped-def]
        """First token (and its log-probability) of a prompt prefilled with the stages in
        req.pipeline running the first layers; computed here alone if the pipeline fails."""
        try:
            out = await self._run_pipeline(req, prompt, pages, n_cached, params)
            self.num_pipelined += 1
            if (m := self.metrics) is not None:  # type: ignore[attr-defined]
                m.pipelined.labels("ok").inc()
            return out
        except (PipelineError, grpc.aio.AioRpcError, asyncio.TimeoutError) as e:
            why = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            log.warning("pipelined prefill failed; computing the prompt here",
                        extra={"request_id": req.request_id, "error": why or type(e).__name__})
            self.num_pipeline_fallbacks += 1
            if (m := self.metrics) is not None:  # type: ignore[attr-defined]
                m.pipelined.labels("fallback").inc()
            bt = self.layout.block_tokens  # type: ignore[attr-defined]
            return await self._compute(prompt, pages, n_cached * bt, params)  # type: ignore[attr-defined]

    async def _run_pipeline(self, req, prompt: list[int], pages: list[PageId], n_cached: int,
                            params) -> tuple[int, float]:  # type: ignore[no-untyped-def]
        from pdserve.services.prefill import _first_token

        layout = self.layout  # type: ignore[attr-defined]
        bt, num_layers = layout.block_tokens, layout.num_layers
        peers = list(req.pipeline)[-(num_layers - 1):]  # a stage has one layer at least
        ends = layer_split(num_layers, len(peers) + 1)
        lo = ends[-2]
        cfg = self.loaded.config  # type: ignore[attr-defined]
        timeout = self.transfer_timeout_s  # type: ignore[attr-defined]
        call = self._peer(peers[-1].address).PrefillStage()
        released = False
        try:
            await call.write(self._stage_request(req.request_id, prompt, req.cache_salt,
                                                 n_cached, peers, ends))
            pos, first = n_cached * bt, None
            kvs: list[prefill_pb2.StageKV] = []
            while len(kvs) < len(peers):
                msg = await asyncio.wait_for(call.read(), timeout)
                if msg is grpc.aio.EOF:
                    raise PipelineError(f"stage {peers[-1].worker_id} ended its stream early")
                if msg.WhichOneof("kind") == "kv":
                    kvs.append(msg.kv)
                    continue
                if first is not None or msg.hidden.begin != pos:
                    raise PipelineError(f"hidden chunk at {msg.hidden.begin}, expected {pos}")
                h = hidden_tensor(msg.hidden, self.pool.kv.dtype, cfg.hidden_size,  # type: ignore[attr-defined]
                                  self.pool.kv.device)  # type: ignore[attr-defined]
                n = msg.hidden.num_tokens
                if pos + n > len(prompt):
                    raise PipelineError(f"hidden chunk past the prompt's {len(prompt)} tokens")

                def step(pos=pos, n=n, h=h):  # type: ignore[no-untyped-def]
                    out = self._forward_stage(prompt[pos:pos + n], pos, pages,
                                              (lo, num_layers), h)
                    return _first_token(out, params) if pos + n == len(prompt) else None

                first = await self._in_thread(step, engine=True, touches=pages)  # type: ignore[attr-defined]
                pos += n
            if first is None:
                raise PipelineError(f"the stages delivered {pos} of {len(prompt)} tokens")
            await self._read_stage_kv(kvs, pages[n_cached:], ends)
            await release(call, timeout)  # the stages free their pages
            released = True
            return first
        finally:
            if not released:
                call.cancel()

    async def _read_stage_kv(self, kvs: Sequence[prefill_pb2.StageKV], pages: Sequence[PageId],
                             ends: Sequence[int]) -> None:
        """READs each stage's layers of the pages over NIXL, checking that the stages' layer
        ranges are the ones asked for and their ranges match these pages."""
        lb = self._layer_bytes()
        got = sorted((kv.layer_begin, kv.layer_end) for kv in kvs)
        want = list(zip([0, *ends[:-2]], ends[:-1]))
        if got != want:
            raise PipelineError(f"stages hold layers {got}, expected {want}")
        for kv in kvs:
            size = (kv.layer_end - kv.layer_begin) * lb
            if len(kv.ranges) != len(pages) or any(r.length != size for r in kv.ranges):
                raise PipelineError(f"stage KV of {len(kv.ranges)} ranges for {len(pages)} pages")
            try:
                remote = self.endpoint.remote(kv.agent_name, kv.agent_metadata)  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001 - NIXL raises its own types on bad metadata
                raise PipelineError(f"stage agent {kv.agent_name!r}: {e}") from e
            local = [(self.pool.page_addr(p) + kv.layer_begin * lb, size) for p in pages]  # type: ignore[attr-defined]
            rem = [(r.addr, r.length, r.device_id) for r in kv.ranges]
            done = await self.endpoint.read_groups(remote, [(local, rem)], kv.mem_type or "DRAM",  # type: ignore[attr-defined]
                                                   lambda g: None, self.transfer_timeout_s)  # type: ignore[attr-defined]
            if done != 1:
                raise PipelineError(f"NIXL READ of layers [{kv.layer_begin}, {kv.layer_end}) "
                                    f"from {kv.agent_name} failed")

    # -- a stage -----------------------------------------------------------------------------
    def check_stage(self, req: prefill_pb2.PipelineStageRequest) -> None:
        loaded = self.loaded  # type: ignore[attr-defined]
        n, num_layers = len(req.prompt_token_ids), self.layout.num_layers  # type: ignore[attr-defined]
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if not req.request_id:
            raise StageRefused(bad, "request_id: empty")
        if not 0 < n <= loaded.max_context:
            raise StageRefused(bad, f"prompt_token_ids: {n} tokens, must be 1..{loaded.max_context}")
        vocab = loaded.config.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_token_ids):
            raise StageRefused(bad, f"prompt_token_ids: a token id outside [0, {vocab})")
        if not 0 <= req.layer_begin < req.layer_end < num_layers:
            raise StageRefused(bad, f"layer_begin, layer_end: [{req.layer_begin}, "
                                    f"{req.layer_end}) must lie in [0, {num_layers - 1}) (the "
                                    f"last layers are the head's)")
        if not 0 <= req.cached_blocks <= cacheable_blocks(n, self.layout.block_tokens):  # type: ignore[attr-defined]
            raise StageRefused(bad, f"cached_blocks: {req.cached_blocks} for a prompt of {n} tokens")
        if not 0 < req.chunk_tokens <= MAX_CHUNK_TOKENS:
            raise StageRefused(bad, f"chunk_tokens: {req.chunk_tokens}, must be 1..{MAX_CHUNK_TOKENS}")
        ul = list(req.upstream_layers)
        chain = (len(ul) == len(req.upstream)
                 and (ul[-1] == req.layer_begin and all(a < b for a, b in zip([0, *ul], ul))
                      if ul else req.layer_begin == 0))
        if not chain:
            raise StageRefused(bad, "upstream_layers: one increasing layer_end per upstream stage, "
                                    "the last equal to layer_begin")

    async def stage(self, req: prefill_pb2.PipelineStageRequest,
                    rest: AsyncIterator[prefill_pb2.PipelineStageRequest]
                    ) -> AsyncIterator[prefill_pb2.PipelineStageOutput]:
        """Runs layers [layer_begin, layer_end) over the prompt: hidden states out chunk by
        chunk, then the KV messages of the stages before it and its own; holds its pages until
        the caller closes its side (`rest` ends)."""
        self.check_stage(req)
        prompt = list(req.prompt_token_ids)
        layout = self.layout  # type: ignore[attr-defined]
        bt, num_layers = layout.block_tokens, layout.num_layers
        lo, hi = req.layer_begin, req.layer_end
        share = (hi - lo) / num_layers
        c = req.cached_blocks * bt
        work, tokens = attention_work(c, len(prompt) - c) * share, int((len(prompt) - c) * share)
        pages = self.pool.reserve(layout.pages_for(len(prompt)))  # type: ignore[attr-defined]
        self.queued_attention += work  # type: ignore[attr-defined]
        self.queued_tokens += tokens  # type: ignore[attr-defined]
        self.in_flight += 1  # type: ignore[attr-defined]
        up = poller = None
        try:
            if await self._load_cached(prompt, req.cache_salt, pages, req.cached_blocks) \
                    < req.cached_blocks:
                raise StageRefused(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"cached_blocks: fewer than {req.cached_blocks} blocks "
                                   f"loadable from the kvstore")
            if req.upstream:
                up = self._peer(req.upstream[-1].address).PrefillStage()
                async for out in self._relay(req, up, prompt, pages, lo, hi):
                    yield out
            else:
                for pos in range(c, len(prompt), req.chunk_tokens):
                    n = min(req.chunk_tokens, len(prompt) - pos)
                    h = await self._in_thread(self._forward_stage, prompt[pos:pos + n],  # type: ignore[attr-defined]
                                              pos, pages, (lo, hi), engine=True, touches=pages)
                    yield hidden_message(pos, h)
            yield prefill_pb2.PipelineStageOutput(kv=self._stage_kv(pages[req.cached_blocks:], lo, hi))
            self.num_stages_served += 1
            if (m := self.metrics) is not None:  # type: ignore[attr-defined]
                m.pipeline_stages.inc()
            # Until the caller has READ the KV (it closes its side) or goes away. A READ's
            # target must progress its agent meanwhile (UCX: else REMOTE_DISCONNECT).
            poller = asyncio.create_task(self._progress())
            try:
                await asyncio.wait_for(_drain(rest), self.transfer_timeout_s)  # type: ignore[attr-defined]
            except asyncio.TimeoutError:
                log.warning("pipeline stage not released in time; freeing its pages",
                            extra={"request_id": req.request_id})
                return
            if up is not None:  # the caller is done with every stage's KV
                await release(up, self.transfer_timeout_s)  # type: ignore[attr-defined]
                up = None
        finally:
            if poller is not None:
                poller.cancel()
            if up is not None:
                up.cancel()  # failed, or the caller went away
            self._free(pages)  # type: ignore[attr-defined]
            self.queued_attention -= work  # type: ignore[attr-defined]
            self.queued_tokens -= tokens  # type: ignore[attr-defined]
            self.in_flight -= 1  # type: ignore[attr-defined]

    async def _progress(self) -> None:
        agent = self.endpoint.agent  # type: ignore[attr-defined]
        while True:
            agent.get_new_notifs()  # nothing is sent to a prefill agent; this progresses it
            await asyncio.sleep(0.0005)

    async def _relay(self, req, up, prompt: list[int], pages: list[PageId], lo: int, hi: int
                     ) -> AsyncIterator[prefill_pb2.PipelineStageOutput]:  # type: ignore[no-untyped-def]
        """A middle stage: the previous stage's hidden states through this stage's layers, and
        the previous stages' KV messages passed on."""
        cfg = self.loaded.config  # type: ignore[attr-defined]
        await up.write(prefill_pb2.PipelineStageRequest(
            request_id=req.request_id, prompt_token_ids=prompt, cache_salt=req.cache_salt,
            cached_blocks=req.cached_blocks,
            layer_begin=req.upstream_layers[-2] if len(req.upstream) > 1 else 0,
            layer_end=req.upstream_layers[-1], chunk_tokens=req.chunk_tokens,
            upstream=req.upstream[:-1], upstream_layers=req.upstream_layers[:-1]))
        kvs = 0
        while kvs < len(req.upstream):
            msg = await asyncio.wait_for(up.read(), self.transfer_timeout_s)  # type: ignore[attr-defined]
            if msg is grpc.aio.EOF:
                raise StageRefused(grpc.StatusCode.UNAVAILABLE,
                                   f"upstream stage {req.upstream[-1].worker_id} ended early")
            if msg.WhichOneof("kind") == "kv":
                kvs += 1
                yield msg
                continue
            try:
                h = hidden_tensor(msg.hidden, self.pool.kv.dtype, cfg.hidden_size,  # type: ignore[attr-defined]
                                  self.pool.kv.device)  # type: ignore[attr-defined]
            except PipelineError as e:
                raise StageRefused(grpc.StatusCode.INTERNAL, str(e)) from None
            pos, n = msg.hidden.begin, msg.hidden.num_tokens
            if pos + n > len(prompt):
                raise StageRefused(grpc.StatusCode.INTERNAL, "hidden chunk past the prompt")
            out = await self._in_thread(self._forward_stage, prompt[pos:pos + n], pos,  # type: ignore[attr-defined]
                                        pages, (lo, hi), h, engine=True, touches=pages)
            yield hidden_message(pos, out)
