"""The gateway: the public API, the worker registry and the global scheduler.

Lifecycle of one `Generate`:
1. Validate (INVALID_ARGUMENT naming the field); tokenize text with the chat template.
2. Hash the prompt's full blocks (namespace from the workers, the request's cache_salt) and ask
   the kvstore how many leading blocks it holds; no answer = no hits.
3. Pick a decode worker (decode balancer; RESOURCE_EXHAUSTED when none can hold the request)
   and a prefill worker (prefill balancer); reserve pages on the decode worker.
4. Open the decode stream, then ask the prefill worker to compute and push the KV; its answer
   carries the first token, which is streamed at once (time to first token).
5. Relay the decode worker's tokens as text deltas; close with finish_reason, usage and timing.
6. On any failure or client cancellation the decode reservation is released.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc
from pdserve.cache.block_hash import block_hashes, cacheable_blocks
from pdserve.engine.engine import request_pages
from pdserve.engine.loader import load_tokenizer
from pdserve.engine.tokenizer import Tokenizer
from pdserve.scheduler.balancers import pick_decode_index, pick_prefill_index
from pdserve.scheduler.registry import WorkerRegistry, WorkerState
from pdserve.services.admission import InvalidRequest, admit
from pdserve.services.kvstore_client import KVStoreClient
from pdserve.services.membership import RegistryServicer, watch_readiness
from pdserve.services.output import OutputText
from pdserve.services.server import channel, create_server, serve_until_signal, write_ready_file
from pdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

from pdserve.config import GatewaySettings

log = logging.getLogger(__name__)

RETRY_AFTER_MS = 500


async def _empty():
    return
    yield


@dataclass
class InFlight:
    decode: decode_pb2_grpc.DecodeStub | None = None
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, registry: WorkerRegistry, kvstore: KVStoreClient,
                 tokenizer: Tokenizer | None, rpc_timeout_s: float) -> None:
        self.registry = registry
        self.kvstore = kvstore
        self.tokenizer = tokenizer
        self.rpc_timeout_s = rpc_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._inflight: dict[str, InFlight] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = channel(address)
        return ch

    def _pick(self, cached_blocks: int, n_prompt: int, pages: int) -> tuple[WorkerState, WorkerState]:
        pt, dt = self.registry.table("prefill"), self.registry.table("decode")
        if not pt.ids or not dt.ids:
            raise LookupError("no prefill or decode worker in rotation")
        bt = self.registry.workers[pt.ids[0]].spec.block_tokens
        cached = cached_blocks * bt
        d = pick_decode_index(dt.used_pages, dt.free_pages, dt.running, pages)
        if d is None:
            raise MemoryError(f"no decode worker has {pages} free KV pages")
        p = pick_prefill_index(pt.attention, pt.tokens, cached, n_prompt - cached)
        assert p is not None
        return self.registry.workers[pt.ids[p]], self.registry.workers[dt.ids[d]]

    async def Generate(self, request, context):
        t0 = time.monotonic()
        prefills = self.registry.active("prefill")
        if not prefills or not self.registry.active("decode"):
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "no prefill or decode worker is ready; retry shortly")
        spec = prefills[0].spec
        try:
            adm = admit(request, self.tokenizer, spec.vocab_size, spec.max_context)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request.request_id or uuid.uuid4().hex
        if rid in self._inflight:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} is running")
        seed = request.seed or int.from_bytes(hashlib.sha256(rid.encode()).digest()[:8], "little")
        stops = set(self.tokenizer.stop_token_ids) if self.tokenizer else set()
        sampling = common_pb2.SamplingParams(
            max_tokens=adm.max_tokens, temperature=adm.temperature, seed=seed,
            stop_token_ids=sorted(stops | set(adm.stop_token_ids)), top_k=adm.top_k,
            top_p=adm.top_p, logprobs=request.logprobs)
        prompt = adm.prompt
        bt = spec.block_tokens
        # Step 2: how much of the prompt the store holds.
        keys = block_hashes(spec.hash_namespace, request.cache_salt, prompt, bt)
        hint = await self.kvstore.lookup(keys[:cacheable_blocks(len(prompt), bt)]) or 0
        # Step 3: choose workers, reserve decode pages.
        pages = request_pages(bt, len(prompt), adm.max_tokens)
        try:
            pw, dw = self._pick(hint, len(prompt), pages)
        except LookupError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except MemoryError as e:
            # Back-pressure instead of an unbounded queue, with a hint for well-behaved clients.
            context.set_trailing_metadata((("retry-after-ms", str(RETRY_AFTER_MS)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"KV pages: {e}; retry in {RETRY_AFTER_MS} ms or lower max_tokens")
        new_tokens = len(prompt) - hint * bt
        self.registry.bump(dw.spec.worker_id, free_pages=-pages, running=1)
        self.registry.bump(pw.spec.worker_id, queued_tokens=new_tokens)
        decode = decode_pb2_grpc.DecodeStub(self._channel(dw.spec.address))
        prefill = prefill_pb2_grpc.PrefillStub(self._channel(pw.spec.address))
        flight = self._inflight[rid] = InFlight(decode)
        stream = None
        finished = False
        try:
            try:
                res = await decode.Reserve(decode_pb2.ReserveRequest(
                    request_id=rid, prompt_token_ids=prompt, sampling=sampling),
                    timeout=self.rpc_timeout_s)
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT):
                    code = grpc.StatusCode.UNAVAILABLE
                await context.abort(code, f"decode reserve: {e.details()}")
            # Step 4: open the decode stream first, so no token can be missed.
            stream = decode.Stream(decode_pb2.StreamRequest(request_id=rid),
                                   timeout=self.rpc_timeout_s * 10)
            try:
                pre = await prefill.Prefill(prefill_pb2.PrefillRequest(
                    request_id=rid, prompt_token_ids=prompt, cache_salt=request.cache_salt,
                    cached_blocks_hint=hint, sampling=sampling, reservation=res),
                    timeout=self.rpc_timeout_s)
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code != grpc.StatusCode.INVALID_ARGUMENT:
                    code = grpc.StatusCode.UNAVAILABLE
                await context.abort(code, f"prefill: {e.details()}")
            ttft = time.monotonic() - t0
            text = OutputText(self.tokenizer, adm.stop)
            out = [pre.first_token]
            yield gateway_pb2.GenerateResponse(
                request_id=rid, token_ids=[pre.first_token], text=text.push([pre.first_token]),
                logprobs=[pre.first_logprob] if request.logprobs else [])
            # Step 5: relay the rest.
            reason = ""
            try:
                async for chunk in (_empty() if text.stopped else stream):
                    if chunk.token_ids:
                        out.extend(chunk.token_ids)
                        yield gateway_pb2.GenerateResponse(
                            request_id=rid, token_ids=list(chunk.token_ids),
                            text=text.push(chunk.token_ids), logprobs=list(chunk.logprobs))
                    if text.stopped:
                        break
                    if chunk.finish_reason:
                        reason = chunk.finish_reason
                        break
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.CANCELLED and flight.aborted.is_set():
                    reason = "abort"
                else:
                    if code not in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DEADLINE_EXCEEDED):
                        code = grpc.StatusCode.UNAVAILABLE
                    await context.abort(code, f"decode: {e.details()}")
            if text.stopped:  # a stop string ended the text: the decode side stops too
                reason = "stop"
                stream.cancel()
                await self._release(decode, rid)
            elif not reason:
                if not flight.aborted.is_set():
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        "decode: stream ended without a finish reason")
                reason = "abort"
            finished = True
            yield gateway_pb2.GenerateResponse(
                request_id=rid, finish_reason=reason, text=text.flush(),
                usage=gateway_pb2.Usage(prompt_tokens=len(prompt), cached_tokens=pre.cached_tokens,
                                        completion_tokens=len(out)),
                timing=gateway_pb2.Timing(ttft_s=ttft, e2e_s=time.monotonic() - t0))
        finally:
            self._inflight.pop(rid, None)
            if not finished:
                if stream is not None:
                    stream.cancel()
                await self._release(decode, rid)

    async def _release(self, decode: decode_pb2_grpc.DecodeStub, rid: str) -> None:
        try:
            await decode.Release(decode_pb2.ReleaseRequest(request_id=rid), timeout=5)
        except grpc.aio.AioRpcError:
            pass  # the worker is gone or the request already ended; its lease frees the pages

    async def Abort(self, request, context):
        flight = self._inflight.get(request.request_id)
        if flight is None or flight.decode is None:
            return gateway_pb2.AbortResponse(found=False)
        flight.aborted.set()
        await self._release(flight.decode, request.request_id)
        return gateway_pb2.AbortResponse(found=True)

    async def Stats(self, request, context):
        return gateway_pb2.ClusterStatsResponse(
            requests_in_flight=len(self._inflight),
            workers=[gateway_pb2.WorkerStats(
                worker_id=w.spec.worker_id, role=w.spec.role, address=w.spec.address,
                epoch=w.spec.epoch, in_rotation=w.in_rotation, free_pages=w.load.free_pages,
                total_pages=w.load.total_pages, running=w.load.running,
                queued_tokens=w.load.queued_tokens, num_finished=w.load.num_finished)
                for w in sorted(self.registry.workers.values(), key=lambda w: w.spec.worker_id)])

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()


async def run(settings: GatewaySettings) -> None:
    tokenizer = load_tokenizer(settings.model)
    registry = WorkerRegistry()
    kvstore = KVStoreClient(settings.kvstore, settings.lookup_timeout_s)
    gateway = GatewayServicer(registry, kvstore, tokenizer, settings.rpc_timeout_s)
    reg = RegistryServicer(registry)
    server, port, health = await create_server(
        [lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(gateway, s),
         lambda s: registry_pb2_grpc.add_RegistryServicer_to_server(reg, s)],
        [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name,
         registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name],
        settings.host, settings.port,
    )
    stop = asyncio.Event()
    watcher = asyncio.create_task(
        watch_readiness(registry, health, kvstore, settings.worker_timeout_s, stop))
    write_ready_file(settings.ready_file, port)
    log.info("gateway listening", extra={"port": port})

    async def cleanup() -> None:
        stop.set()
        await watcher
        await gateway.close()
        await kvstore.close()

    await serve_until_signal(server, health, cleanup)
